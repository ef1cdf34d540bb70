#!/usr/bin/env python3
"""What the write-intent record (``pool/replication.py`` step 8, ``agents/intent.py``) costs a write (run by
hand; not collected by pytest). The committed code (``--baseline-ref``, default HEAD, from a git worktree
with its C extensions built by gcc) against the working tree (a copy of its files taken at the start, its
C extensions built the same way, so that every round measures the same code while others edit the tree;
``--live-tree`` runs it in place), side by side in one run, each side in a child process of this script
on a local pool of its own (a metadata service and agents as processes on 127.0.0.1, plaintext, 1
file-backed drive per agent, the daemons run from that side's tree, which each child checks):

1. 4 KiB random writes at QD32 to a 2-replica volume (IOPS, p50 and p99 latency);
2. 1 MiB sequential writes at QD8 to it (MB/s);
3. control: 4 KiB random writes at QD32 to a 1-replica volume of the same pool (the change should cost
   plain volumes nothing).

Both volumes are written whole first, so every figure writes allocated space. Rounds alternate
(baseline, current, current, baseline, ...); the table gives each side's median over the rounds, the
ratio current / baseline of the medians, and the median of the per-round ratios (the two sides of a
round ran back to back).

4. current tree only: a writer process with 32 x 1 MiB writes in flight is SIGKILLed; the time from its
   lease's expiry (meta ``--lease-ttl``) to the volume being healthy again, and the bytes the resync
   copied ("copies resynced after a writer ended uncleanly" in the metadata service's log, and
   ``nvpool_meta_writer_resync_bytes_total`` from its metrics endpoint).

    .venv/bin/python tests/bench_write_intent.py [--baseline-ref HEAD] [--rounds 3] [--seconds 5]
        [--size 256M] [--agents 4] [--crash-rounds 3] [--lease-ttl 3] [--kill-after 2] [--repair-rate 64M]
        [--live-tree] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # (last: a child's PYTHONPATH, the tree it measures, comes first)

from tests.benchlib import KiB4, MiB, daemon_problems, say, seq_timed, seq_write  # noqa: E402

EXTENSIONS = ("agents/_cserve.c", "proto/_ccomplete.c", "client/nbd/_cnbd.c", "client/_csync.c")
R2, R1, CRASH_VOL = "wi2", "wi1", "wic"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")
RESYNCED = re.compile(r"volume (\S+): copies resynced after a writer ended uncleanly: (\d+) bytes in (\d+) chunks"
                      r".*\(([\d.]+)s\)")
EXPIRED = re.compile(r"lease of .* on volume (\S+) \(write\) expired")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def under(path: str, tree: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(tree) + os.sep)


# ------------------------------------------------------------------------------------------- child: I/O
async def rand_write(vol: Any, seconds: float, qd: int = 32, io: int = KiB4, seed: int = 1) -> dict[str, float]:
    """``io`` writes at random ``io``-aligned offsets, ``qd`` at a time, for ``seconds``."""
    rng = random.Random(seed)
    data = rng.randbytes(io)
    blocks = vol.size // io
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            off = rng.randrange(blocks) * io
            t = time.perf_counter()
            await vol.write(off, data)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    wall = time.perf_counter() - t0
    return {"iops": len(lat) / wall, "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
            "ops": float(len(lat))}


# ------------------------------------------------------------------------------------------- child: checks
def check_client_tree(tree: str) -> dict[str, str]:
    """This process imports nvpool, and every compiled module, from ``tree``; what it loaded."""
    import importlib

    import nvpool
    from nvpool.proto import compiled

    if not under(nvpool.__file__ or "", tree):
        raise SystemExit(f"nvpool resolves to {nvpool.__file__}, not into {tree} (sys.path {sys.path[:4]})")
    if compiled.pure_python():
        raise SystemExit("NVPOOL_PURE_PYTHON is set: the compiled hot paths would not be measured")
    got = {}
    for name in compiled.MODULES:
        mod = importlib.import_module(name)
        if not under(mod.__file__ or "", tree):
            raise SystemExit(f"{name} resolves to {mod.__file__}, not into {tree}")
        got[name] = os.path.realpath(mod.__file__ or "")
    got["nvpool"] = os.path.realpath(nvpool.__file__ or "")
    return got


def check_daemons(c: Any, tree: str) -> list[str]:
    """Every daemon of the pool runs ``tree``'s code: its working directory (``python -m nvpool`` puts it
    first on sys.path) and PYTHONPATH are the tree, and every agent mapped the tree's compiled command loop."""
    real = os.path.realpath(tree)
    notes = []
    for info in [c.meta, *c.agents]:
        pid = info.pid
        cwd = os.readlink(f"/proc/{pid}/cwd")
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0")
                   if "=" in kv)
        cmd = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
        if os.path.realpath(cwd) != real or os.path.realpath(env.get("PYTHONPATH", "")) != real:
            raise SystemExit(f"{info.name} (pid {pid}) runs in {cwd} with PYTHONPATH {env.get('PYTHONPATH')!r}, "
                             f"not {real}")
        if cmd[1:3] != ["-m", "nvpool"]:
            raise SystemExit(f"{info.name} (pid {pid}) was started as {cmd[:3]}, not python -m nvpool")
        if info is not c.meta:
            maps = Path(f"/proc/{pid}/maps").read_text()
            so = [x.split()[-1] for x in maps.splitlines() if "_cserve" in x]
            if not so or not all(under(p, tree) for p in so):
                raise SystemExit(f"{info.name} (pid {pid}) did not map {tree}'s agents/_cserve: {sorted(set(so))}")
            notes.append(f"{info.name}: {so[0]}")
    return notes


def new_cluster(args: argparse.Namespace, directory: Path, extra: list[str], metrics: bool = False) -> Any:
    from nvpool.client.cluster import LocalCluster

    os.environ.pop("NVPOOL_TLS", None)  # plaintext pool
    c = LocalCluster(directory, agents=args.agents, drives_per_agent=1, drive_size=args.drive_size, tls=False,
                     metrics=metrics)
    c.meta_extra = ["--agent-timeout", str(args.agent_timeout), "--heartbeat-interval", str(args.heartbeat_interval),
                    "--rebuild-after", "600", *extra]
    return c


# ------------------------------------------------------------------------------------------- child: sides
async def measure(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> None:
    from nvpool.client.api import AsyncPool
    from nvpool.proto.units import parse_size

    size = parse_size(args.size)
    c = new_cluster(args, work / "pool", [])
    try:
        await asyncio.to_thread(c.up)
        pool = await AsyncPool.connect(c.meta.address)
        try:
            await pool.create_volume(R2, size, replicas=2)
            await pool.create_volume(R1, size, replicas=1)
            r2, r1 = await pool.open(R2), await pool.open(R1)
            fill = {R2: await seq_write(r2, total=size), R1: await seq_write(r1, total=size)}
            out["daemons"] = check_daemons(c, args.tree)
            await rand_write(r2, 0.5, seed=99)  # warm: the random-write path, renewals
            sec = args.seconds
            out["r2_rand"] = await rand_write(r2, sec, seed=args.seed)
            out["r2_seq"] = {"mbps": (await seq_timed(r2, sec, write=True))[0]}
            out["r1_rand"] = await rand_write(r1, sec, seed=args.seed)
            out["fill_mbps"] = fill
            out["client_stats"] = {R2: dict(r2.stats), R1: dict(r1.stats)}
            await r2.close()
            await r1.close()
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(c.down)
        out["problems"] = daemon_problems(c)


def log_size(c: Any) -> int:
    p = c.dir / "logs" / "meta.log"
    return p.stat().st_size if p.exists() else 0


def meta_log_since(c: Any, since: int) -> list[tuple[float, str]]:
    """(wall time, message) of the metadata service's log lines after byte ``since``."""
    with open(c.dir / "logs" / "meta.log", "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m is not None:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(4)))
    return out


def resync_metric(c: Any) -> Optional[float]:
    """``nvpool_meta_writer_resync_bytes_total`` from the metadata service's metrics endpoint."""
    if not c.meta.metrics:
        return None
    try:
        with urllib.request.urlopen(f"http://{c.meta.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^nvpool_meta_writer_resync_bytes_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def crash(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> None:
    """SIGKILL a writer with 32 x 1 MiB writes in flight, ``--crash-rounds`` times: lease expiry -> healthy,
    and the bytes resynced."""
    from nvpool.client.api import AsyncPool
    from nvpool.client.metaclient import MetaClient
    from nvpool.proto.units import parse_size

    size = parse_size(args.size)
    rate = ["--repair-rate", args.repair_rate] if args.repair_rate else []
    c = new_cluster(args, work / "crash", ["--lease-ttl", str(args.lease_ttl), *rate], metrics=True)
    rounds: list[dict[str, Any]] = []
    out["crash"] = rounds
    try:
        await asyncio.to_thread(c.up)
        pool = await AsyncPool.connect(c.meta.address)
        try:
            await pool.create_volume(CRASH_VOL, size, replicas=2)
            v = await pool.open(CRASH_VOL)
            await seq_write(v, total=size)
            await v.close()  # a clean close: nothing to resync
        finally:
            await pool.close()
        out["daemons"] = check_daemons(c, args.tree)
        m = MetaClient(c.meta.address)
        try:
            for n in range(args.crash_rounds):
                rounds.append(await crash_round(args, c, m, work, n))
        finally:
            await m.close()
    finally:
        await asyncio.to_thread(c.down)
        out["problems"] = daemon_problems(c)


async def crash_round(args: argparse.Namespace, c: Any, m: Any, work: Path, n: int) -> dict[str, Any]:
    since = log_size(c)
    metric0 = resync_metric(c)
    marker = work / f"writer{n}.progress"
    err = open(work / f"writer{n}.err", "wb")
    env = dict(os.environ, PYTHONPATH=args.tree)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", "writer", "--tree", args.tree,
                             "--meta", c.meta.address, "--volume", CRASH_VOL, "--marker", str(marker),
                             "--seed", str(1000 + n)],
                            stdout=err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=args.tree)
    err.close()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"crash round {n}: the writer did not start writing: "
                                 + (work / f"writer{n}.err").read_text(errors="replace")[-2000:])
            await asyncio.sleep(0.01)
        await asyncio.sleep(args.kill_after)
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    acked, t_first, t_last = (float(x) for x in marker.read_text().split())
    to_mono = time.monotonic() - time.time()
    t_gone: Optional[float] = None  # the first poll without a writer lease: the lease's expiry
    t_early_ok: Optional[float] = None  # "ok" without a writer lease before the resync was done
    t_degraded: Optional[float] = None  # the first "degraded" after the lease's end
    expired: Optional[float] = None  # monotonic, from meta.log: the service expired the lease
    resync: Optional[tuple[float, int, int, float]] = None  # (monotonic, bytes, chunks, seconds) from meta.log
    deadline = t_kill + args.lease_ttl + 60
    while True:
        info = await m.get_volume(CRASH_VOL)
        now = time.monotonic()
        for wall, msg in meta_log_since(c, since):  # what the service had done when it answered
            if (e := EXPIRED.search(msg)) and e.group(1) == CRASH_VOL and expired is None:
                expired = wall + to_mono
            if (r := RESYNCED.search(msg)) and r.group(1) == CRASH_VOL and resync is None:
                resync = (wall + to_mono, int(r.group(2)), int(r.group(3)), float(r.group(4)))
        if not any(h["mode"] == "write" for h in info.holders):
            if t_gone is None:
                t_gone = now
            if info.health == "ok" and resync is not None:
                t_ok = now
                break
            if info.health == "ok" and t_early_ok is None and t_degraded is None:
                t_early_ok = now
            if info.health != "ok" and t_degraded is None:
                t_degraded = now
        if now > deadline:
            raise SystemExit(f"crash round {n}: not healthy and resynced {deadline - t_kill:.0f}s after the kill "
                             f"(holders {info.holders}, health {info.health})")
        await asyncio.sleep(0.01)
    assert t_gone is not None and resync is not None
    metric1 = resync_metric(c)
    res = {
        "round": n,
        "writer_acked_mib": acked,
        "writer_mbps": acked * MiB / 1e6 / (t_last - t_first) if t_last > t_first else 0.0,
        "kill_to_expiry_s": t_gone - t_kill,
        "expiry_to_ok_s": t_ok - t_gone,
        "kill_to_ok_s": t_ok - t_kill,
        "expiry_to_expired_logged_s": None if expired is None else expired - t_gone,
        "expiry_to_degraded_s": None if t_degraded is None else t_degraded - t_gone,
        "early_ok_s": None if t_early_ok is None else (t_degraded or t_ok) - t_early_ok,
        "expiry_to_resync_logged_s": resync[0] - t_gone,
        "resync_bytes": resync[1],
        "resync_chunks": resync[2],
        "resync_logged_s": resync[3],
        "resync_metric_bytes": None if metric0 is None or metric1 is None else metric1 - metric0,
    }
    say(f"  crash round {n}: writer acked {acked:.0f} MiB; expiry {res['kill_to_expiry_s']:.2f}s after the kill, "
        f"ok {res['expiry_to_ok_s']:.3f}s after it; resync {res['resync_bytes']} bytes "
        f"({res['resync_chunks']} chunks, {res['resync_logged_s']}s logged); metric delta {res['resync_metric_bytes']}")
    return res


async def writer(args: argparse.Namespace) -> None:
    """The process a crash round SIGKILLs: ``--in-flight`` x 1 MiB writes at random 4 KiB-aligned offsets,
    for ever; ``--marker`` says "acked MiB, first ack, last ack" (monotonic), rewritten as it goes."""
    from nvpool.client.api import AsyncPool

    pool = await AsyncPool.connect(args.meta)
    vol = await pool.open(args.volume, holder=f"bench writer {os.getpid()}")
    rng = random.Random(args.seed)
    data = rng.randbytes(MiB)
    blocks = (vol.size - MiB) // KiB4
    acked = 0
    first = 0.0
    tmp = args.marker + ".tmp"

    def note() -> None:
        with open(tmp, "w") as f:
            f.write(f"{acked} {first!r} {time.monotonic()!r}\n")
        os.replace(tmp, args.marker)

    async def one() -> None:
        nonlocal acked, first
        while True:
            await vol.write(rng.randrange(blocks + 1) * KiB4, data)
            acked += 1
            if not first:
                first = time.monotonic()
                note()

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.05)
            if first:
                note()

    await asyncio.gather(progress(), *(one() for _ in range(args.in_flight)))


def child(args: argparse.Namespace) -> int:
    import uvloop

    loaded = check_client_tree(args.tree)
    if args.child == "writer":
        uvloop.run(writer(args))
        return 0
    work = Path(tempfile.mkdtemp(prefix=f"nvpool-wibench-{args.child}-"))
    out: dict[str, Any] = {"side": args.child, "tree": args.tree, "loaded": loaded}
    try:
        uvloop.run(crash(args, work, out) if args.child == "crash" else measure(args, work, out))
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------------- parent
def git(*a: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *a], check=True, capture_output=True, text=True).stdout.strip()


def build_extensions(tree: Path) -> None:
    """Build ``tree``'s four C extensions in place with gcc."""
    inc = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".cpython-311-x86_64-linux-gnu.so"
    for src in EXTENSIONS:
        so = tree / (src[: -len(".c")] + suffix)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", f"-I{inc}", str(tree / src), "-o", str(so), "-lpthread"],
                       check=True)


def baseline_tree(ref: str, tmp: Path) -> Path:
    """A git worktree of ``ref`` with its four C extensions built in place."""
    wt = tmp / "baseline"
    git("worktree", "add", "--detach", str(wt), ref)
    build_extensions(wt)
    return wt


def working_files() -> list[str]:
    """The working tree's files: tracked (as they are now) and untracked ones git does not ignore."""
    names = git("ls-files", "-z", "-co", "--exclude-standard").split("\0")
    return sorted({n for n in names if n and os.path.lexists(ROOT / n)})


def fingerprint() -> str:
    """A hash of the working tree's files (names, symlink targets, contents): did it change meanwhile?"""
    h = hashlib.sha256()
    for n in working_files():
        p = ROOT / n
        h.update(n.encode() + b"\0")
        h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()[:12]


def snapshot_tree(tmp: Path) -> Path:
    """A copy of the working tree as it is now, its C extensions built from the copied sources: every
    current-side round measures the same code while others go on editing the tree."""
    snap = tmp / "current"
    for n in working_files():
        src, dst = ROOT / n, snap / n
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    build_extensions(snap)
    return snap


def stale_extensions(tree: Path) -> list[str]:
    """Compiled modules of ``tree`` older than their source (this script does not rebuild the working tree)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".cpython-311-x86_64-linux-gnu.so"
    out = []
    for src in EXTENSIONS:
        so = tree / (src[: -len(".c")] + suffix)
        if not so.exists():
            out.append(f"{so.name}: missing")
        elif so.stat().st_mtime < (tree / src).stat().st_mtime:
            out.append(f"{src}: source newer than {so.name}")
    return out


def others_running() -> list[str]:
    """Other test runs on this machine (pytest processes not ours): they would skew the figures."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(os.path.basename(a) in ("pytest", "py.test") for a in argv):
            out.append(f"{d.name} {' '.join(argv)[:100]}")
    return out


def run_child(args: argparse.Namespace, side: str, tree: Path, tmp: Path, n: int) -> dict[str, Any]:
    out = tmp / f"{side}-{n}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("NVPOOL_PURE_PYTHON", "NVPOOL_TLS")}
    env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--tree", str(tree), "--out", str(out),
           "--seconds", str(args.seconds), "--size", args.size, "--agents", str(args.agents),
           "--drive-size", args.drive_size, "--agent-timeout", str(args.agent_timeout),
           "--heartbeat-interval", str(args.heartbeat_interval), "--crash-rounds", str(args.crash_rounds),
           "--lease-ttl", str(args.lease_ttl), "--repair-rate", args.repair_rate, "--kill-after", str(args.kill_after), "--seed", str(args.seed + n)]
    if args.keep:
        cmd.append("--keep")
    def others() -> bool:
        seen = others_running()
        for p in seen:
            if p not in args.others:
                args.others.append(p)
                say(f"  WARNING: another test run is using the CPU: {p}")
        return bool(seen)

    busy = others()
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=env, cwd=str(tree), stdin=subprocess.DEVNULL, timeout=args.child_timeout).returncode
    if rc != 0 or not out.exists():
        raise SystemExit(f"{side} child (round {n}) failed: exit {rc}")
    got: dict[str, Any] = json.loads(out.read_text())
    got["seconds"] = time.monotonic() - t0
    got["others_running"] = others() or busy
    return got


FIGURES = [  # (key, field, label, unit, higher is better)
    ("r2_rand", "iops", "4K rand write QD32, 2 replicas", "IOPS", True),
    ("r2_rand", "p50_ms", "  p50 latency", "ms", False),
    ("r2_rand", "p99_ms", "  p99 latency", "ms", False),
    ("r2_seq", "mbps", "1M seq write QD8, 2 replicas", "MB/s", True),
    ("r1_rand", "iops", "4K rand write QD32, 1 replica (control)", "IOPS", True),
    ("r1_rand", "p50_ms", "  p50 latency", "ms", False),
    ("r1_rand", "p99_ms", "  p99 latency", "ms", False),
]


def num(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def marked(r: dict[str, Any], key: str, fld: str) -> str:
    """A round's figure, starred when another test run shared the CPU."""
    return num(r[key][fld]) + ("*" if r.get("others_running") else "")


def table(runs: list[tuple[int, str, dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    rounds = sorted({n for n, _, _ in runs})
    by = {(n, s): r for n, s, r in runs}
    rows = []
    head = (f"{'figure':<42} {'unit':<5} {'baseline':>9} {'current':>9} {'ratio':>6} {'rnd ratio':>9}  "
            f"{'baseline per round':<26} current per round")
    lines = [head, "-" * len(head)]
    for key, fld, label, unit, _ in FIGURES:
        b = [by[(n, "baseline")][key][fld] for n in rounds if (n, "baseline") in by]
        c = [by[(n, "current")][key][fld] for n in rounds if (n, "current") in by]
        pair = [by[(n, "current")][key][fld] / by[(n, "baseline")][key][fld] for n in rounds
                if (n, "current") in by and (n, "baseline") in by and by[(n, "baseline")][key][fld]]
        mb, mc = statistics.median(b), statistics.median(c)
        ratio = mc / mb if mb else None
        rr = statistics.median(pair) if pair else None
        rows.append({"figure": label.strip(), "of": key, "unit": unit, "baseline": round(mb, 3), "current": round(mc, 3),
                     "ratio": None if ratio is None else round(ratio, 3),
                     "median_round_ratio": None if rr is None else round(rr, 3),
                     "baseline_rounds": [round(x, 3) for x in b], "current_rounds": [round(x, 3) for x in c]})
        lines.append(f"{label:<42} {unit:<5} {num(mb):>9} {num(mc):>9} "
                     f"{'-' if ratio is None else f'{ratio:.3f}':>6} {'-' if rr is None else f'{rr:.3f}':>9}  "
                     f"{' '.join(marked(by[(n, 'baseline')], key, fld) for n in rounds if (n, 'baseline') in by):<26} "
                     f"{' '.join(marked(by[(n, 'current')], key, fld) for n in rounds if (n, 'current') in by)}")
    if any(r.get("others_running") for _, _, r in runs):
        lines.append("(* another test run was using the CPU when that child started or ended)")
    return "\n".join(lines), rows


def crash_table(rounds: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    spec = [
        ("kill_to_expiry_s", "SIGKILL -> writer lease gone (poll)", "s"),
        ("expiry_to_ok_s", "lease gone -> volume ok, resynced (poll)", "s"),
        ("kill_to_ok_s", "SIGKILL -> volume ok, resynced (poll)", "s"),
        ("expiry_to_expired_logged_s", "lease gone -> meta logs it expired", "s"),
        ("expiry_to_degraded_s", "lease gone -> first 'degraded' (poll)", "s"),
        ("early_ok_s", "'ok' w/o writer before resync: window", "s"),
        ("expiry_to_resync_logged_s", "lease gone -> meta logs resync done", "s"),
        ("resync_logged_s", "resync duration (meta.log)", "s"),
        ("resync_bytes", "bytes resynced (meta.log)", "MiB"),
        ("resync_metric_bytes", "bytes resynced (metrics delta)", "MiB"),
        ("resync_chunks", "resync chunks (meta.log)", ""),
        ("writer_acked_mib", "writer: MiB acknowledged before the kill", "MiB"),
        ("writer_mbps", "writer: MB/s before the kill", "MB/s"),
    ]
    head = f"{'figure':<42} {'unit':<5} {'median':>9}  per round"
    lines, rows = [head, "-" * len(head)], []
    for key, label, unit in spec:
        xs = [r[key] for r in rounds]
        vals = [None if x is None else (x / MiB if unit == "MiB" and "bytes" in key else float(x)) for x in xs]
        known = [v for v in vals if v is not None]
        med = statistics.median(known) if known else None
        rows.append({"figure": label, "unit": unit, "median": None if med is None else round(med, 3),
                     "rounds": [None if v is None else round(v, 3) for v in vals]})
        lines.append(f"{label:<42} {unit:<5} {num(med):>9}  {' '.join(num(v) for v in vals)}")
    early = sum(1 for r in rounds if r["early_ok_s"] is not None)
    seen = sum(1 for r in rounds if r["expiry_to_degraded_s"] is not None)
    lines.append(f"(after the writer's lease was gone, the volume said 'degraded' in {seen} and 'ok' before its resync "
                 f"was done in {early} of {len(rounds)} rounds; polled every ~10 ms)")
    return "\n".join(lines), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", default="HEAD", help="the committed code to compare the working tree with")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (baseline, current), alternating the order")
    ap.add_argument("--seconds", type=float, default=5.0, help="each timed write loop")
    ap.add_argument("--size", default="256M", help="each volume (written whole first)")
    ap.add_argument("--drive-size", default="1G")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--agent-timeout", type=float, default=1.5, help="meta --agent-timeout")
    ap.add_argument("--heartbeat-interval", type=float, default=0.4, help="meta --heartbeat-interval (also how "
                                                                           "often it expires leases)")
    ap.add_argument("--crash-rounds", type=int, default=3, help="figure 4's writer kills (0: none)")
    ap.add_argument("--lease-ttl", type=float, default=3.0, help="figure 4's meta --lease-ttl")
    ap.add_argument("--repair-rate", default="", help="figure 4's meta --repair-rate, the resync's copy rate "
                                                      "(default: the service's own, 64M)")
    ap.add_argument("--kill-after", type=float, default=2.0, help="figure 4: seconds of writing before the kill")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child-timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the pools' directories (logs) afterwards")
    ap.add_argument("--live-tree", action="store_true",
                    help="run the current side from the working tree itself (its compiled modules as built there), "
                         "not from a snapshot of it taken at the start")
    ap.add_argument("--json", action="store_true")
    # internal: one side's measurement, in a child process
    ap.add_argument("--child", choices=("current", "baseline", "crash", "writer"), help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--marker", help=argparse.SUPPRESS)
    ap.add_argument("--in-flight", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.agents < 2:
        raise SystemExit("--agents must be at least 2 (2 replicas)")
    tmp = Path(tempfile.mkdtemp(prefix="nvpool-wibench-"))
    args.others = []
    t0 = time.monotonic()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    wt: Optional[Path] = None
    try:
        base_commit = git("rev-parse", "--short", args.baseline_ref)
        say(f"baseline: worktree of {args.baseline_ref} ({base_commit}) in {tmp / 'baseline'}")
        wt = baseline_tree(args.baseline_ref, tmp)
        same = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", args.baseline_ref, "--"]).returncode == 0
        if same:
            say(f"NOTE: the tracked files of the working tree equal {args.baseline_ref}: both sides run the same code "
                f"(once the change is committed, pass the commit before it, e.g. --baseline-ref {args.baseline_ref}~1)")
        fp0 = fingerprint()
        if args.live_tree:
            cur = ROOT
            stale = stale_extensions(ROOT)
            if stale:
                say(f"WARNING: the working tree's compiled modules are stale: {stale}")
        else:
            cur = snapshot_tree(tmp)
            stale = []
            say(f"current: a snapshot of the working tree (files {fp0}) in {cur}, its C extensions built")
        runs: list[tuple[int, str, dict[str, Any]]] = []
        for n in range(args.rounds):
            for side in (("baseline", "current") if n % 2 == 0 else ("current", "baseline")):
                tree = wt if side == "baseline" else cur
                say(f"round {n + 1}/{args.rounds}: {side}")
                r = run_child(args, side, tree, tmp, n)
                say(f"  {side}: 4K QD32 r2 {r['r2_rand']['iops']:.0f} IOPS (p50 {r['r2_rand']['p50_ms']:.2f} ms, "
                    f"p99 {r['r2_rand']['p99_ms']:.2f} ms); 1M QD8 r2 {r['r2_seq']['mbps']:.0f} MB/s; "
                    f"4K QD32 r1 {r['r1_rand']['iops']:.0f} IOPS; {r['seconds']:.0f}s")
                runs.append((n, side, r))
        crash: dict[str, Any] = {}
        if args.crash_rounds:
            say(f"4. writer SIGKILLed with 32 x 1 MiB in flight, {args.crash_rounds} times (current tree, "
                f"--lease-ttl {args.lease_ttl:g})")
            crash = run_child(args, "crash", cur, tmp, args.rounds)
        fp1 = fingerprint()
        elapsed = time.monotonic() - t0
        load1 = Path("/proc/loadavg").read_text().split()[:3]
        text, rows = table(runs)
        out = sys.stderr if args.json else sys.stdout
        what = "the working tree in place" if args.live_tree else f"a snapshot of the working tree (files {fp0})"
        print(f"\nwrite-intent cost: baseline {args.baseline_ref} ({base_commit}) vs {what}; "
              f"{args.agents} agents x 1 drive of {args.drive_size}, plaintext; volumes {args.size}, "
              f"--seconds {args.seconds:g}; medians of {args.rounds} alternating rounds; ratio = current / "
              f"baseline of the medians, rnd ratio = median of the per-round ratios; {elapsed:.0f}s in all; "
              f"loadavg {' '.join(load0)} -> {' '.join(load1)}\n", file=out)
        print(text, file=out)
        crows: list[dict[str, Any]] = []
        if crash:
            ctext, crows = crash_table(crash["crash"])
            print(f"\n4. current tree: writer with 32 x 1 MiB writes in flight SIGKILLed after {args.kill_after:g}s "
                  f"of writing; meta --lease-ttl {args.lease_ttl:g} --heartbeat-interval {args.heartbeat_interval:g} "
                  f"--repair-rate {args.repair_rate or '(default 64M)'}; volume {args.size}, 2 replicas\n", file=out)
            print(ctext, file=out)
        for p in others_running():
            if p not in args.others:
                args.others.append(p)
        if same:
            print(f"\nNOTE: the working tree's tracked files equal {args.baseline_ref} ({base_commit}): both sides ran "
                  f"the same code, the ratios are noise", file=out)
        if fp1 != fp0:
            print(f"\nNOTE: the working tree changed during the run (files {fp0} -> {fp1}): "
                  + ("later rounds measured other code" if args.live_tree else "the snapshot taken at the start was "
                     "measured"), file=out)
        if args.others:
            print(f"\nWARNING: other test runs used the CPU during this run (figures skewed): {args.others}", file=out)
        problems = [f"{s} round {n}: {p}" for n, s, r in runs for p in r.get("problems", [])]
        problems += [f"crash: {p}" for p in crash.get("problems", [])]
        if stale:
            print(f"\nWARNING: stale compiled modules in the working tree: {stale}", file=out)
        if problems:
            print(f"\ndaemon log errors ({len(problems)}):\n  " + "\n  ".join(problems[:40]), file=out)
        if args.json:
            print(json.dumps({"args": {k: v for k, v in vars(args).items() if v is not None},
                              "baseline_commit": base_commit, "tree_files": [fp0, fp1], "seconds": round(elapsed, 1), "rows": rows,
                              "crash_rows": crows, "crash_rounds": crash.get("crash", []),
                              "runs": [{"round": n, "side": s, **r} for n, s, r in runs],
                              "daemon_log_errors": problems, "stale_extensions": stale}, indent=2))
        return 0
    finally:
        if wt is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
