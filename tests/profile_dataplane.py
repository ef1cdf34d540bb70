#!/usr/bin/env python3
"""Where a 4 KiB I/O's CPU goes (run by hand; not collected by pytest): the profile behind issue 17.

A plaintext pool with ONE agent (so the agent's CPU is attributable) on 127.0.0.1; the client runs in
this process. For 4 KiB random reads at QD32 and QD1 and random writes at QD32 over TCP (and reads over
shm), it prints:

* microseconds of CPU per I/O on the client (``time.process_time``) and on the agent (its
  ``/proc/PID/stat`` utime + stime), from unprofiled runs;
* a profiled run of each side (cProfile: the agent runs under a wrapper that profiles the whole
  daemon), its self time grouped by stage (codec, transport, volume logic, capability checks,
  drive I/O syscalls, socket syscalls, event loop, the rest) and scaled to the unprofiled CPU per
  I/O, plus the top functions.

    .venv/bin/python tests/profile_dataplane.py [--seconds 3] [--top 12] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from nvpool.client.cli.bench import run_bench  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402

MiB = 1 << 20

WRAPPER = '''#!/bin/sh
exec {python} {script} "$@"
'''
PROFILED_MAIN = '''import cProfile, os, runpy, signal, sys
out = os.environ.get("NVPOOL_PROFILE_OUT")
sys.argv = ["nvpool", *sys.argv[3:]]  # called as: -m nvpool ARGS
if not out or "agent" not in sys.argv[1:2]:
    runpy.run_module("nvpool", run_name="__main__")
    sys.exit(0)
pr = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *a: (pr.disable(), pr.dump_stats(out), pr.enable()))
pr.enable()
try:
    runpy.run_module("nvpool", run_name="__main__")
finally:
    pr.disable()
    pr.dump_stats(out)
'''

STAGES = [
    ("codec (proto/dataplane.py)", ("proto/dataplane.py",)),
    ("capability checks", ("proto/capability.py",)),
    ("client transport (proto/transport.py, shm)", ("proto/transport.py", "client/transport_shm.py")),
    ("client volume logic (split, retries, locks)", ("client/volume.py", "client/api.py")),
    ("agent connection (agents/dataplane.py)", ("agents/dataplane.py", "agents/shm.py")),
    ("agent core (checks, fences, stats)", ("agents/core.py", "agents/drive.py", "agents/metrics.py")),
    ("benchmark loop (client/cli/bench.py)", ("client/cli/bench.py",)),
    ("drive syscalls (pread/pwrite)", ("built-in method posix.pread", "built-in method posix.pwrite")),
    ("socket writes (transport write/writelines)", ("method 'write' of 'uvloop", "method 'writelines' of 'uvloop",
                                                    "method 'send", "sendmsg")),
    ("event loop and socket reads (uvloop's run: epoll, recv, callbacks)", ("asyncio/", "uvloop", "runners.py",
                                                                          "_asyncio.Future", "method 'set_result'")),
]


def stage_of(key: tuple[str, int, str]) -> str:
    fname, _, func = key
    where = f"{fname}:{func}"
    for name, pats in STAGES:
        if any(p in where for p in pats):
            return name
    return "the rest"


def profile_table(stats: pstats.Stats, cpu_us: float) -> tuple[dict[str, float], list[tuple[str, float]]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    stages: dict[str, float] = {}
    for key, v in raw.items():
        stages[stage_of(key)] = stages.get(stage_of(key), 0.0) + v[2]
    scaled = {k: cpu_us * t / total for k, t in sorted(stages.items(), key=lambda kv: -kv[1])}
    top = sorted(((f"{Path(k[0]).name}:{k[1]}({k[2]})", cpu_us * v[2] / total) for k, v in raw.items()),
                 key=lambda kv: -kv[1])
    return scaled, top


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nvpool-profile-"))
    (work / "main.py").write_text(PROFILED_MAIN)
    wrapper = work / "python"
    wrapper.write_text(WRAPPER.format(python=sys.executable, script=work / "main.py"))
    wrapper.chmod(0o755)
    agent_prof = work / "agent.prof"
    os.environ["NVPOOL_PROFILE_OUT"] = str(agent_prof)
    os.environ.pop("NVPOOL_TLS", None)
    c = LocalCluster(work / "pool", agents=1, drives_per_agent=1, drive_size="1G", tls=False, python=str(wrapper))
    results: dict[str, Any] = {}
    try:
        c.up()
        meta = c.meta.address
        from nvpool import client

        with client.connect(meta) as pool:
            pool.create_volume("v", 512 * MiB)
        uvloop.run(run_bench(meta, "v", io_type="write", io_size=MiB, io_depth=8, total=512 * MiB))
        agent_pid = c.agents[0].pid
        cases = [("read QD32 tcp", "read", 32, "tcp"), ("read QD1 tcp", "read", 1, "tcp"),
                 ("write QD32 tcp", "write", 32, "tcp"), ("read QD32 shm", "read", 32, "shm")]
        for label, io_type, qd, transport in cases:
            kw = dict(io_type=io_type, io_size=4096, io_depth=qd, pattern="rand", seconds=args.seconds,
                      transport=transport)
            uvloop.run(run_bench(meta, "v", **kw))  # warm
            a0, c0 = proc_cpu(agent_pid), time.process_time()
            r = uvloop.run(run_bench(meta, "v", **kw))
            ops = max(1, r.ops)
            client_us = 1e6 * (time.process_time() - c0) / ops
            agent_us = 1e6 * (proc_cpu(agent_pid) - a0) / ops
            # profiled: the client in this process, the agent's profile dumped on SIGUSR1 around the run
            os.kill(agent_pid, __import__("signal").SIGUSR1)
            time.sleep(0.3)
            before = pstats.Stats(str(agent_prof)) if agent_prof.exists() else None
            pr = cProfile.Profile()
            pr.enable()
            uvloop.run(run_bench(meta, "v", **kw))
            pr.disable()
            os.kill(agent_pid, __import__("signal").SIGUSR1)
            time.sleep(0.3)
            after = pstats.Stats(str(agent_prof))
            agent_stats = _diff(after, before)
            cstages, ctop = profile_table(pstats.Stats(pr), client_us)
            astages, atop = profile_table(agent_stats, agent_us)
            results[label] = {"iops": r.iops, "p50_us": r.lat_p50_us, "client_cpu_us": client_us,
                              "agent_cpu_us": agent_us, "client_stages": cstages, "agent_stages": astages,
                              "client_top": ctop[:args.top], "agent_top": atop[:args.top]}
    finally:
        c.down()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for label, r in results.items():
        print(f"\n== 4K {label}: {r['iops']:.0f} IOPS, p50 {r['p50_us']:.0f} us; CPU per I/O: client "
              f"{r['client_cpu_us']:.1f} us, agent {r['agent_cpu_us']:.1f} us")
        for side in ("client", "agent"):
            print(f"  {side}, us per I/O by stage (profile shares scaled to the unprofiled CPU):")
            for k, v in r[f"{side}_stages"].items():
                print(f"    {v:6.1f}  {k}")
            print(f"  {side}, top functions:")
            for k, v in r[f"{side}_top"]:
                print(f"    {v:6.1f}  {k}")
    return 0


def _diff(after: pstats.Stats, before: "pstats.Stats | None") -> pstats.Stats:
    """The agent's profile over one run: the cumulative dump after it minus the one before it."""
    if before is None:
        return after
    a: dict[Any, Any] = after.stats  # type: ignore[attr-defined]
    b: dict[Any, Any] = before.stats  # type: ignore[attr-defined]
    for key, v in a.items():
        if key in b:
            w = b[key]
            a[key] = (v[0] - w[0], v[1] - w[1], v[2] - w[2], v[3] - w[3], v[4])
    return after


if __name__ == "__main__":
    sys.exit(main())
