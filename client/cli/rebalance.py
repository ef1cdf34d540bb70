"""``nvpool pool rebalance | drain | remove``: grow and shrink the pool online."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Callable

from nvpool.client.cli.common import BadArgument, emit, human, server_name, size_arg, table, volume_name, with_meta
from nvpool.client.metaclient import MetaClient
from nvpool.proto import nvpool_pb2 as pb


def rebalance_dict(st: Any) -> dict[str, Any]:
    return {
        "state": st.state,
        "bytes_total": st.bytes_total,
        "bytes_done": st.bytes_done,
        "current_volume": st.current_volume,
        "error": st.error,
        "imbalance_before": round(st.imbalance_before, 4),
        "imbalance_after": round(st.imbalance_after, 4),
        "max_rate": st.max_rate,
        "moves": [
            {"volume": m.volume, "old_width": m.old_width, "new_width": m.new_width, "bytes": m.bytes,
             "from_drives": list(m.from_drives), "to_drives": list(m.to_drives)}
            for m in st.moves
        ],
    }


def describe_plan(d: dict[str, Any], rate: int) -> str:
    if not d["moves"]:
        return f"nothing to move: the pool is balanced (imbalance {d['imbalance_before']:.3f})"
    rows = [[m["volume"], f"{m['old_width']} -> {m['new_width']}", human(m["bytes"]),
             str(len(m["from_drives"])), str(len(m["to_drives"]))] for m in d["moves"]]
    eta = ""
    if rate:
        eta = f", about {d['bytes_total'] / rate:.0f} s at {human(rate)}/s"
    return (
        table(rows, ["VOLUME", "WIDTH", "TO MOVE", "FROM DRIVES", "TO DRIVES"])
        + f"\n\n{human(d['bytes_total'])} to move{eta}; imbalance {d['imbalance_before']:.3f} -> {d['imbalance_after']:.3f}"
    )


async def _follow(meta: MetaClient, quiet: bool) -> Any:
    """Poll the rebalance until it ends, with a progress bar."""
    from tqdm import tqdm

    st = await meta.call("GetRebalance", pb.RebalanceStatusRequest())
    bar = tqdm(total=st.bytes_total or 1, unit="B", unit_scale=True, desc="rebalance", disable=quiet)
    try:
        while st.state == "running":
            bar.total = st.bytes_total or 1
            bar.n = st.bytes_done
            bar.set_postfix_str(st.current_volume)
            bar.refresh()
            await asyncio.sleep(0.25)
            st = await meta.call("GetRebalance", pb.RebalanceStatusRequest())
        bar.n = st.bytes_done
        bar.refresh()
    finally:
        bar.close()
    return st


def cmd_rebalance(args: argparse.Namespace) -> int:
    rate = args.max_rate or 0
    if args.cancel and (args.plan or args.wait or rate or args.volume):
        raise BadArgument("--cancel takes none of --plan, --wait, --max-rate, --volume")
    quiet = args.json or not sys.stderr.isatty()

    async def go(meta: MetaClient) -> Any:
        if args.cancel:
            return await meta.call("CancelRebalance", pb.CancelRebalanceRequest())
        st = await meta.call(
            "Rebalance", pb.RebalanceRequest(plan_only=args.plan, max_rate=rate, volumes=args.volume or [])
        )
        if args.wait and not args.plan and st.state == "running":
            st = await _follow(meta, quiet)
        return st

    t0 = time.monotonic()
    st = with_meta(args, go)
    d = rebalance_dict(st)
    if args.plan:
        emit(args, d, describe_plan(d, rate))
    elif args.cancel:
        emit(args, d, f"rebalance {d['state']}")
    else:
        msg = f"rebalance {d['state']}: {human(d['bytes_done'])} of {human(d['bytes_total'])} moved"
        if args.wait:
            msg += f" in {time.monotonic() - t0:.1f} s"
        if d["error"]:
            msg += f"\nerror: {d['error']}"
        emit(args, d, msg)
    return 1 if d["state"] == "failed" else 0


def cmd_drain(args: argparse.Namespace, remove: bool = False) -> int:
    quiet = args.json or not sys.stderr.isatty()

    async def go(meta: MetaClient) -> Any:
        # remove = drain, wait until the server is empty, then take it out (the service refuses to
        # remove a live server that was not drained)
        st = await meta.call("Drain", pb.DrainRequest(host=args.server, max_rate=getattr(args, "max_rate", 0) or 0))
        if (getattr(args, "wait", False) or remove) and st.state == "running":
            st = await _follow(meta, quiet)
        if remove and st.state in ("done", "idle"):  # now empty: take it out of the pool
            st = await meta.call("Drain", pb.DrainRequest(host=args.server, remove=True))
        return st

    d = rebalance_dict(with_meta(args, go))
    verb = "removed" if remove else "draining"
    emit(args, d, f"{args.server}: {verb if d['state'] in ('done', 'idle', 'running') else d['state']}; "
                  f"{human(d['bytes_done'])} of {human(d['bytes_total'])} moved" + (f"\nerror: {d['error']}" if d["error"] else ""))
    return 1 if d["state"] == "failed" else 0


def cmd_undrain(args: argparse.Namespace) -> int:
    async def go(meta: MetaClient) -> Any:
        return await meta.call("Drain", pb.DrainRequest(host=args.server, undrain=True))

    d = rebalance_dict(with_meta(args, go))
    emit(args, d, f"{args.server}: back in service")
    return 0


def register(ps: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    r = ps.add_parser(
        "rebalance", help="re-spread volumes over all drives (online)",
        description=(
            "Re-spread existing volumes so their stripes cover every drive in the pool (after servers\n"
            "were added), moving as little data as possible. Online: clients keep reading and writing;\n"
            "no write is lost. Resumable after a restart of the metadata service; cancellable."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--plan", action="store_true", help="dry run: what moves where, bytes to move, balance before/after")
    r.add_argument("--max-rate", type=size_arg(1, None, "rate"),
                   help="copy bandwidth limit in bytes per second, e.g. 200M (default: no limit)")
    r.add_argument("--wait", action="store_true", help="follow progress until done")
    r.add_argument("--cancel", action="store_true", help="cancel a running rebalance (nothing is lost)")
    r.add_argument("--volume", action="append", type=volume_name, help="only these volumes (repeatable)")
    common(r)
    r.set_defaults(func=cmd_rebalance)

    d = ps.add_parser("drain", help="move every extent off a server (before taking it out)")
    d.add_argument("server", type=server_name, help="server (agent host) name")
    d.add_argument("--wait", action="store_true", help="follow progress until done")
    d.add_argument("--max-rate", type=size_arg(1, None, "rate"),
                   help="bytes/s for the moves, e.g. 200M (default: unlimited)")
    common(d)
    d.set_defaults(func=cmd_drain)

    rm = ps.add_parser("remove", help="drain a server, then remove it from the pool")
    rm.add_argument("server", type=server_name, help="server (agent host) name")
    common(rm)
    rm.set_defaults(func=lambda a: cmd_drain(a, remove=True))

    u = ps.add_parser("undrain", help="put a draining server back in service",
                      description="Stop draining a server: it takes new extents again (what already moved stays moved).")
    u.add_argument("server", help="server (agent host) name")
    common(u)
    u.set_defaults(func=cmd_undrain)
