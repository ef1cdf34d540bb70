"""Protobuf <-> domain conversions, used only by gRPC edges (servicers and stubs' callers)."""

from __future__ import annotations

from typing import Iterable, Optional

from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto.layout import Column, Extent, Layout
from nvpool.proto.records import Endpoint, ExtentRecord


def _column_to_pb(c: Column) -> pb.Column:
    return pb.Column(extents=[
        pb.Extent(extent_id=e.extent_id, drive_id=e.drive_id, drive_offset=e.drive_offset, length=e.length)
        for e in c.extents
    ])


def _column_from_pb(c: pb.Column) -> Column:
    return Column(tuple(Extent(e.extent_id, e.drive_id, e.drive_offset, e.length) for e in c.extents))


def layout_body_to_pb(lay: Layout) -> pb.LayoutBody:
    return pb.LayoutBody(
        volume_id=lay.volume_id,
        name=lay.name,
        generation=lay.generation,
        size=lay.size,
        stripe_unit=lay.stripe_unit,
        columns=[_column_to_pb(c) for c in lay.columns],
        mirrors=[pb.Mirror(columns=[_column_to_pb(c) for c in m]) for m in lay.mirrors],
        states=[pb.ReplicaState(column=i, replica=k, state=st) for i, k, st in lay.states],
    )


def layout_body_from_pb(m: pb.LayoutBody, target: Optional[Layout] = None) -> Layout:
    return Layout(
        volume_id=m.volume_id,
        name=m.name,
        generation=m.generation,
        size=m.size,
        stripe_unit=m.stripe_unit,
        columns=tuple(_column_from_pb(c) for c in m.columns),
        target=target,
        mirrors=tuple(tuple(_column_from_pb(c) for c in mm.columns) for mm in m.mirrors),
        states=tuple((s.column, s.replica, s.state) for s in m.states),
    )


def layout_to_pb(lay: Layout, endpoints: Iterable[Endpoint]) -> pb.Layout:
    msg = pb.Layout(current=layout_body_to_pb(lay), endpoints=[endpoint_to_pb(e) for e in endpoints])
    if lay.target is not None:
        msg.target.CopyFrom(layout_body_to_pb(lay.target))
        msg.has_target = True
    return msg


def layout_from_pb(m: pb.Layout) -> tuple[Layout, dict[str, Endpoint]]:
    target = layout_body_from_pb(m.target) if m.has_target else None
    lay = layout_body_from_pb(m.current, target)
    return lay, {e.drive_id: endpoint_from_pb(e) for e in m.endpoints}


def endpoint_to_pb(e: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        drive_id=e.drive_id, agent_id=e.agent_id, address=e.address, unix_path=e.unix_path, host=e.host,
        alive=e.alive, tls=e.tls,
    )


def endpoint_from_pb(m: pb.Endpoint) -> Endpoint:
    return Endpoint(m.drive_id, m.agent_id, m.address, m.unix_path, m.host, m.alive, m.tls)


def extent_record_to_pb(r: ExtentRecord) -> pb.ExtentRecord:
    return pb.ExtentRecord(
        extent_id=r.extent_id, drive_id=r.drive_id, drive_offset=r.drive_offset, length=r.length,
        volume_id=r.volume_id, min_generation=r.min_generation, replicas=r.replicas,
    )


def extent_record_from_pb(m: pb.ExtentRecord) -> ExtentRecord:
    return ExtentRecord(m.extent_id, m.drive_id, m.drive_offset, m.length, m.volume_id, m.min_generation,
                        max(1, m.replicas))
