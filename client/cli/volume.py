"""``nvpool volume ...`` and ``nvpool pool ...``: volume management and pool status."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TypeVar

from nvpool.client.metaclient import VolumeInfo
from nvpool.client.cli import rebalance as cli_rebalance
from nvpool.client.cli.common import (
    MAX_UINT32,
    SIZE_ALIGN,
    add_common,
    emit,
    human,
    int_arg,
    size_arg,
    stripe_unit_arg,
    table,
    volume_name,
    with_meta,
)
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto.errors import UsageError
from nvpool.proto.units import MAX_SIZE

T = TypeVar("T")

#: the largest volume size that stays below 2^63 after the metadata service rounds it up
MAX_VOLUME_SIZE = MAX_SIZE // SIZE_ALIGN * SIZE_ALIGN


def describe(v: VolumeInfo) -> str:
    lines = [
            f"volume      {v.name} (id {v.volume_id})",
            f"size        {human(v.size)} ({v.size} bytes)",
            f"striping    {v.stripe_width} columns x {human(v.stripe_unit)} stripe unit",
            f"replicas    {v.replicas}" + (f" (failure domain: {v.failure_domain})" if v.replicas > 1 else ""),
            f"health      {v.health}" + {"degraded": " (a copy is out of service, on a server that is down, or "
                                                     "not yet known identical: I/O goes on)",
                                         "unavailable": " (a server holding some of its data is down: I/O to that "
                                                        "part waits, then fails)"}.get(v.health, ""),
            f"generation  {v.generation}",
            f"state       {v.state}",
            f"servers     {', '.join(sorted(set(v.hosts)))}",
            f"drives      {len(v.drives)}",
            f"created     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.created))}",
            "open by     " + ("; ".join(f"{h['holder']} ({h['mode']})" for h in v.holders) or "nobody"),
    ]
    if v.replica_info:
        rows = [[str(r["column"]), str(r["replica"]), r["state"], r["host"], r["domain"], ",".join(d[:8] for d in r["drives"])]
                for r in v.replica_info]
        lines += ["", table(rows, ["COLUMN", "REPLICA", "STATE", "SERVER", "DOMAIN", "DRIVES"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- volume
def rounding(requested: int, size: int) -> str:
    """The sentence that says the metadata service rounded a size (empty if it did not)."""
    if size == requested:
        return ""
    asked = f"{human(requested)} ({requested} bytes)" if requested >= 1024 else f"{requested} bytes"
    return f"rounded up from {asked} to a multiple of {human(SIZE_ALIGN)}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def size_dict(v: VolumeInfo, requested: int) -> dict[str, Any]:
    """``--json`` output of create/resize: the volume, the size asked for, and whether it was rounded."""
    d = v.to_dict()
    d["requested_size"] = requested
    d["rounded_up"] = v.size != requested
    return d


def cmd_create(args: argparse.Namespace) -> int:
    size = args.size
    v = with_meta(args, lambda m: m.create_volume(args.name, size, args.stripe_unit or 0, args.stripe_width or 0,
                                                  args.replicas, args.failure_domain))
    note = rounding(size, v.size)
    servers = len({r["host"] for r in v.replica_info}) if v.replica_info else len(set(v.hosts))
    emit(args, size_dict(v, size),
         f"created {v.name}: {human(v.size)}{f' ({note})' if note else ''}, "
         f"{plural(v.stripe_width, 'column')} x {human(v.stripe_unit)}"
         + (f" x {v.replicas} replicas (failure domain {v.failure_domain})" if v.replicas > 1 else "")
         + f" on {plural(servers, 'server')}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    vols = with_meta(args, lambda m: m.list_volumes())
    rows = [[v.name, human(v.size), str(v.stripe_width), human(v.stripe_unit), str(v.replicas), str(v.generation),
             v.state, v.health] for v in vols]
    emit(
        args, [v.to_dict() for v in vols],
        table(rows, ["NAME", "SIZE", "WIDTH", "UNIT", "COPIES", "GEN", "STATE", "HEALTH"]) if rows else "no volumes",
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    v = with_meta(args, lambda m: m.get_volume(args.name))
    emit(args, v.to_dict(), describe(v))
    return 0


def cmd_volume_status(args: argparse.Namespace) -> int:
    v = with_meta(args, lambda m: m.get_volume(args.name))
    rows = [[h["mode"], h["holder"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["granted"]))]
            for h in v.holders]
    text = table(rows, ["MODE", "HOLDER", "SINCE"]) if rows else f"{v.name}: not open"
    emit(args, {"name": v.name, "holders": v.holders}, text)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    size = args.size

    async def go(m: Any) -> tuple[VolumeInfo, VolumeInfo]:
        old = await m.get_volume(args.name)
        target = -(-size // SIZE_ALIGN) * SIZE_ALIGN
        if target < old.size:
            raise UsageError(
                f"volume {old.name} is {human(old.size)}; shrinking it to {human(target)} would discard data "
                "(only growing is supported)"
            )
        if target == old.size:
            return old, old
        return old, await m.resize_volume(args.name, size)

    old, v = with_meta(args, go)
    note = rounding(size, v.size)
    if v.size == old.size:
        text = f"{v.name} is already {human(v.size)}{f' ({note})' if note else ''}; nothing to do"
    else:
        text = (f"resized {v.name} from {human(old.size)} to {human(v.size)}{f' ({note})' if note else ''} "
                f"(generation {v.generation})")
    emit(args, size_dict(v, size), text)
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    async def go(m: Any) -> Any:
        return await m.call("VolumeUsage", pb.VolumeUsageRequest(names=args.names or []), timeout=args.timeout)

    resp = with_meta(args, go)
    vols = [{"name": u.name, "size": u.size, "replicas": u.replicas, "allocated": u.allocated,
             "written": u.written if u.written_known else None} for u in resp.volumes]
    rows = [[v["name"], human(v["size"]), str(v["replicas"]), human(v["allocated"]),
             human(v["written"]) if v["written"] is not None else "?"] for v in vols]
    emit(args, vols, table(rows, ["NAME", "PROVISIONED", "REPLICAS", "ALLOCATED", "WRITTEN"]) if rows else "no volumes")
    return 0


def cmd_drive_list(args: argparse.Namespace) -> int:
    st = with_meta(args, lambda m: m.pool_status())
    drives = []
    for a in st.agents:
        for d in a.drives:
            i = d.info
            drives.append({"server": a.host, "agent": a.agent_id, "drive_id": i.drive_id, "path": i.path,
                           "model": i.model, "serial": i.serial, "capacity": i.capacity, "used": d.used,
                           "extents": d.extents, "state": i.state if a.alive else "unreachable", "errors": i.errors,
                           "last_error": i.last_error})
    rows = [[d["server"], d["drive_id"][:8], d["path"], d["model"] or "-", d["serial"] or "-", human(d["capacity"]),
             f"{100 * d['used'] / d['capacity']:.0f}%" if d["capacity"] else "-", d["state"], str(d["errors"])]
            for d in drives]
    emit(args, drives, table(rows, ["SERVER", "DRIVE", "PATH", "MODEL", "SERIAL", "CAPACITY", "USED", "STATE", "ERRORS"])
         if rows else "no drives registered")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes and sys.stdin.isatty():
        answer = input(f"delete volume {args.name!r} and all its data? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    with_meta(args, lambda m: m.delete_volume(args.name, args.force))
    emit(args, {"deleted": args.name}, f"deleted {args.name}")
    return 0


# ---------------------------------------------------------------------------- pool
def scrub_dict(st: Any) -> dict[str, Any]:
    return {k: getattr(st, k) for k in (
        "volume", "state", "bytes_total", "bytes_done", "checksum_errors", "mismatches", "repaired", "unrepairable",
        "busy", "started", "finished", "error", "max_rate", "background")}


def describe_scrub(d: dict[str, Any]) -> str:
    if d["state"] == "idle":
        return f"{d['volume']}: never scrubbed"
    took = f" in {d['finished'] - d['started']:.1f} s" if d["finished"] else ""
    text = (f"{d['volume']}: scrub {d['state']}{took}: {human(d['bytes_done'])} of {human(d['bytes_total'])} compared; "
            f"{d['checksum_errors']} checksum errors, {d['mismatches']} mismatches, {d['repaired']} copies repaired, "
            f"{d['unrepairable']} unrepairable")
    if d["busy"]:
        text += f", {d['busy']} blocks being written (compared next pass)"
    if d["error"]:
        text += f"\nerror: {d['error']}"
    return text


def cmd_scrub(args: argparse.Namespace) -> int:
    quiet = args.json or not sys.stderr.isatty()

    async def go(m: Any) -> Any:
        if args.status:
            return await m.call("GetScrub", pb.GetScrubRequest(name=args.name))
        st = await m.call("ScrubVolume", pb.ScrubVolumeRequest(name=args.name, max_rate=args.max_rate or 0))
        if args.no_wait:
            return st
        from tqdm import tqdm

        bar = tqdm(total=st.bytes_total or 1, unit="B", unit_scale=True, desc=f"scrub {args.name}", disable=quiet)
        try:
            while st.state == "running":
                bar.total = st.bytes_total or 1
                bar.n = st.bytes_done
                bar.set_postfix_str(f"{st.checksum_errors + st.mismatches} found, {st.repaired} repaired")
                bar.refresh()
                await asyncio.sleep(0.25)
                st = await m.call("GetScrub", pb.GetScrubRequest(name=args.name))
            bar.n = st.bytes_done
            bar.refresh()
        finally:
            bar.close()
        return st

    d = scrub_dict(with_meta(args, go))
    emit(args, d, describe_scrub(d))
    if d["state"] == "failed":
        return 1
    # for scripts: 4 = a copy was found wrong and nothing could repair it; 0 otherwise (clean or repaired)
    return 4 if d["unrepairable"] else 0


def status_dict(st: Any) -> dict[str, Any]:
    reb = st.rebalance
    return {
        "rebalance": {"state": reb.state or "idle", "bytes_total": reb.bytes_total, "bytes_done": reb.bytes_done,
                      "current_volume": reb.current_volume, "error": reb.error},
        "health": st.health,
        "pool_id": st.pool_id,
        "meta_store": st.meta_store,
        "meta_leader": st.meta_leader,
        "meta_epoch": st.meta_epoch,
        "releasing_extents": st.releasing_extents,
        "releasing_bytes": st.releasing_bytes,
        "degraded_volumes": st.degraded_volumes,
        "repairs": [
            {"volume": r.volume, "column": r.column, "replica": r.replica, "state": r.state, "reason": r.reason,
             "since": r.since, "bytes_total": r.bytes_total, "bytes_done": r.bytes_done, "eta_s": r.eta_s}
            for r in st.repairs
        ],
        "scrubs": [scrub_dict(x) for x in st.scrubs],
        "unavailable_volumes": list(st.unavailable_volumes),
        "capacity": st.capacity,
        "used": st.used,
        "volumes": st.volumes,
        "agents": [
            {
                "agent_id": a.agent_id, "host": a.host, "rack": a.rack, "address": a.address,
                "control_address": a.control_address, "alive": a.alive,
                "state": a.state, "last_seen": a.last_seen,
                "drives": [
                    {"drive_id": d.info.drive_id, "path": d.info.path, "capacity": d.info.capacity,
                     "used": d.used, "extents": d.extents, "state": d.info.state}
                    for d in a.drives
                ],
            }
            for a in st.agents
        ],
    }


def cmd_status(args: argparse.Namespace) -> int:
    st = with_meta(args, lambda m: m.pool_status())
    d = status_dict(st)
    rows = []
    for a in d["agents"]:
        cap = sum(x["capacity"] for x in a["drives"])
        used = sum(x["used"] for x in a["drives"])
        rows.append([
            a["agent_id"], a["host"], a["address"], "up" if a["alive"] else "DOWN", a["state"] or "active",
            str(len(a["drives"])), human(cap), f"{100 * used / cap:.0f}%" if cap else "-",
        ])
    head = (
        f"health {d['health']}   capacity {human(d['capacity'])}   used {human(d['used'])} "
        f"({100 * d['used'] / d['capacity']:.1f}%)   volumes {d['volumes']}" if d["capacity"]
        else f"health {d['health']}   no drives registered"
    )
    if d["meta_store"].startswith("etcd://"):
        head += f"\nmetadata leader {d['meta_leader']} (term {d['meta_epoch']}, store {d['meta_store']})"
    reb = d["rebalance"]
    if reb["state"] == "running":
        head += f"\nrebalance running: {human(reb['bytes_done'])} of {human(reb['bytes_total'])} moved ({reb['current_volume']})"
    elif reb["state"] == "failed":
        head += f"\nlast rebalance failed: {reb['error']}"
    if d["repairs"]:
        head += f"\n{plural(d['degraded_volumes'], 'volume')} not fully redundant (nvpool volume show NAME for each replica):"
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in d["repairs"]:
            groups.setdefault((r["volume"], r["state"], r["reason"]), []).append(r)
        for (vol, state, reason), rs in groups.items():
            if state == "writer-resync":
                head += f"\n  {vol}: copies not yet known identical ({reason})"
                continue
            done, total = sum(r["bytes_done"] for r in rs), sum(r["bytes_total"] for r in rs)
            prog = ""
            if state != "out" and total:
                eta = max(r["eta_s"] for r in rs)
                prog = f", {human(done)} of {human(total)} copied" + (f", ETA {eta:.0f}s" if eta else "")
            since = min(r["since"] for r in rs)
            at = time.strftime("%H:%M:%S", time.localtime(since)) if since else "?"
            head += f"\n  {vol}: {plural(len(rs), 'replica')} {state}{prog} (since {at}: {reason})"
    if d["unavailable_volumes"]:
        names = d["unavailable_volumes"]
        head += (f"\n{plural(len(names), 'volume')} unavailable (a server holding part of {'its' if len(names) == 1 else 'their'} "
                 f"data is down; unreplicated volumes wait for it): {', '.join(names[:20])}"
                 + (f" and {len(names) - 20} more" if len(names) > 20 else ""))
    for sc in d["scrubs"]:
        if sc["state"] == "running":
            head += (f"\nscrub running: {sc['volume']}, {human(sc['bytes_done'])} of {human(sc['bytes_total'])}, "
                     f"{sc['checksum_errors'] + sc['mismatches']} found, {sc['repaired']} repaired")
        elif sc["checksum_errors"] or sc["mismatches"] or sc["state"] == "failed":
            at = time.strftime("%Y-%m-%d %H:%M", time.localtime(sc["finished"])) if sc["finished"] else "?"
            head += (f"\nlast scrub of {sc['volume']} ({at}): " + (f"failed: {sc['error']}" if sc["state"] == "failed" else
                     f"{sc['checksum_errors']} checksum errors, {sc['mismatches']} mismatches, {sc['repaired']} copies "
                     f"repaired, {sc['unrepairable']} unrepairable"))
    emit(args, d, head + ("\n\n" + table(rows, ["AGENT", "SERVER", "ADDRESS", "STATE", "MODE", "DRIVES", "CAPACITY", "USED"]) if rows else ""))
    return 0 if d["health"] == "ok" else 3  # for scripts: 3 = the pool is not healthy (degraded, empty)


def register(sub: Any) -> None:
    v = sub.add_parser("volume", help="create, list, show, resize and delete volumes",
                       description="Manage logical volumes (striped across drives and servers).")
    vs = v.add_subparsers(dest="volume_command", metavar="ACTION", required=True)

    c = vs.add_parser("create", help="create a volume (reads as zeros)",
                      description="Create a volume striped over the pool's drives, on distinct servers where possible.")
    c.add_argument("name", type=volume_name,
                   help="1-64 letters, digits, '.', '_', '-', starting with a letter or digit")
    c.add_argument("--size", required=True, type=size_arg(1, MAX_VOLUME_SIZE),
                   help=f"e.g. 20G, 512M, bytes; rounded up to a multiple of {human(SIZE_ALIGN)} (the output says so)")
    c.add_argument("--stripe-unit", type=stripe_unit_arg,
                   help="bytes per stripe unit on one drive: a power of two from 4K to 16M (default 1M)")
    c.add_argument("--stripe-width", type=int_arg(1, MAX_UINT32, "stripe width"),
                   help="number of columns (drives), at least 1; default: as wide as the pool allows")
    c.add_argument("--replicas", type=int_arg(1, 3, "replicas"), default=1,
                   help="copies of every column, each in another failure domain (default 1: plain striping, the "
                        "fastest; 2 or 3 survive the loss of a server)")
    c.add_argument("--failure-domain", default="host", metavar="host|LABEL",
                   help="what the copies must not share: 'host' (the server, default) or an agent label key such "
                        "as 'rack' (agents started with --label rack=NAME)")
    add_common(c)
    c.set_defaults(func=cmd_create)

    lst = vs.add_parser("list", help="list volumes")
    add_common(lst)
    lst.set_defaults(func=cmd_list)

    s = vs.add_parser("show", help="show one volume")
    s.add_argument("name", type=volume_name)
    add_common(s)
    s.set_defaults(func=cmd_show)

    vst = vs.add_parser("status", help="who has a volume open (writer lease, readers)",
                        description="The processes holding a volume open: the writer (exclusive) and the readers.")
    vst.add_argument("name", type=volume_name)
    add_common(vst)
    vst.set_defaults(func=cmd_volume_status)

    r = vs.add_parser("resize", help="grow a volume online")
    r.add_argument("name", type=volume_name)
    r.add_argument("--size", required=True, type=size_arg(1, MAX_VOLUME_SIZE),
                   help=f"new size (not smaller than the current one); rounded up to a multiple of {human(SIZE_ALIGN)}")
    add_common(r)
    r.set_defaults(func=cmd_resize)

    du = vs.add_parser("du", help="provisioned, allocated and written bytes of volumes",
                       description="Provisioned size, bytes allocated on drives (every replica) and bytes that may "
                                   "hold data (asked from the agents), per volume.")
    du.add_argument("names", nargs="*", type=volume_name, help="volumes (default: every volume)")
    add_common(du)
    du.set_defaults(func=cmd_du)

    sc = vs.add_parser(
        "scrub", help="compare every copy of a replicated volume and repair wrong ones",
        description=("Read every written block of every copy of a replicated volume on the server that holds it,\n"
                     "check it against the checksum stored when it was written, compare the copies, and rewrite a\n"
                     "wrong copy from a right one (online: I/O pauses for milliseconds while a block is repaired).\n"
                     "Only checksums cross the network unless a copy is wrong. The metadata service also scrubs\n"
                     "every replicated volume in the background (--scrub-interval, --scrub-rate of nvpool meta).\n"
                     "Exit status: 0 clean or repaired, 1 the scrub failed, 4 a block no copy could be trusted for."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("name", type=volume_name)
    sc.add_argument("--max-rate", type=size_arg(1, None, "rate"),
                    help="bytes per second read from each copy, e.g. 200M (default: no limit)")
    sc.add_argument("--no-wait", action="store_true", help="start the scrub and return (see --status)")
    sc.add_argument("--status", action="store_true", help="show the running or last scrub of the volume")
    add_common(sc)
    sc.set_defaults(func=cmd_scrub)

    d = vs.add_parser("delete", help="delete a volume and free its space")
    d.add_argument("name", type=volume_name)
    d.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    d.add_argument("--force", action="store_true",
                   help="delete even while the volume is open (its holders are fenced: their I/O fails)")
    add_common(d)
    d.set_defaults(func=cmd_delete)

    dr = sub.add_parser("drive", help="the pool's drives (like nvme list)",
                        description="Inspect the drives of the pool.")
    drs = dr.add_subparsers(dest="drive_command", metavar="ACTION", required=True)
    dl = drs.add_parser("list", help="server, path, model, serial, capacity, used, state, I/O errors")
    add_common(dl)
    dl.set_defaults(func=cmd_drive_list)

    p = sub.add_parser("pool", help="pool status, rebalance, drain",
                       description="Inspect and operate the pool as a whole.")
    ps = p.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    st = ps.add_parser("status", help="servers, drives, capacity, health")
    add_common(st)
    st.set_defaults(func=cmd_status)
    cli_rebalance.register(ps, add_common)
