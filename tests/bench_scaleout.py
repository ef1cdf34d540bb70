#!/usr/bin/env python3
"""Scale-out benchmark (run by hand as root; not collected by pytest).

Hosts in network namespaces joined by veth links to one bridge: a metadata service in the root
namespace, one client host, and storage hosts whose egress links are limited by a token-bucket
shaper (what a storage server's NIC is to its readers). A volume is created on 1 storage host and
read from the client host; then the pool grows to 2, 4 and 8 hosts, each time rebalancing the same
volume online, and the read throughput is measured again. Prints throughput(N), the scaling
efficiency throughput(N) / (N x throughput(1)), and the foreground throughput while a rebalance
runs as a fraction of before.

    sudo .venv/bin/python tests/bench_scaleout.py [--rate 400mbit] [--hosts 1,2,4,8] [--size 512M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import BRIDGE_ADDR, Fabric, Host, available  # noqa: E402

PY = sys.executable


def cli(*args: str, host: Host | None = None, meta: str = "", timeout: float = 600) -> str:
    argv = [PY, "-m", "nvpool", *args]
    if host is not None:
        argv = host.exec_args(argv)
    env = dict(os.environ, NVPOOL_META=meta, PYTHONPATH=str(ROOT))
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"nvpool {' '.join(args)} failed: {p.stderr[-2000:]}")
    return p.stdout


def wait_file(path: Path, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:
                pass
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="400mbit", help="egress limit of each storage host (tc tbf rate)")
    ap.add_argument("--hosts", default="1,2,4,8", help="pool sizes to measure")
    ap.add_argument("--size", default="512M", help="volume size")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per read measurement")
    ap.add_argument("--io-depth", type=int, default=16)
    ap.add_argument("--rebalance-rate", default="20M", help="--max-rate of the rebalance measured under load")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"skipped: {why}")
        return 0
    steps = [int(x) for x in args.hosts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="nvpool-scaleout-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: list[dict[str, float]] = []
    during: dict[str, float] = {}
    fabric = Fabric()
    try:
        meta_ready = work / "meta.ready"
        procs.append(subprocess.Popen(
            [PY, "-m", "nvpool", "meta", "--listen", f"{BRIDGE_ADDR}:0", "--store", f"sqlite:{work / 'meta.db'}",
             "--ready-file", str(meta_ready)],
            cwd=ROOT, stdout=open(work / "meta.log", "wb"), stderr=subprocess.STDOUT,
        ))
        meta = str(wait_file(meta_ready)["address"])
        client_host = fabric.add_host("cli")
        storage: list[Host] = []

        def add_storage() -> None:
            i = len(storage)
            h = fabric.add_host(f"s{i}", rate=args.rate)
            ready = work / f"s{i}.ready"
            procs.append(h.popen(
                [PY, "-m", "nvpool", "agent", "--meta", meta, "--listen", f"{h.address}:0", "--name", f"s{i}",
                 "--drive", f"file:{work / f's{i}.img'}:2G", "--ready-file", str(ready), "--heartbeat", "0.5"],
                cwd=ROOT, stdout=open(work / f"s{i}.log", "wb"), stderr=subprocess.STDOUT,
            ))
            wait_file(ready)
            storage.append(h)

        def read_mbps() -> float:
            out = cli("bench", "vol", "--io-type", "read", "--io-size", "1M", "--io-depth", str(args.io_depth),
                      "--seconds", str(args.seconds), "--transport", "tcp", "--json", host=client_host, meta=meta)
            return float(json.loads(out)["MBps"])

        for _ in range(steps[0]):
            add_storage()
        cli("volume", "create", "vol", "--size", args.size, meta=meta)
        cli("bench", "vol", "--io-type", "write", "--io-size", "1M", "--io-depth", "8", "--total", args.size,
            "--pattern", "seq", "--json", host=client_host, meta=meta)
        for n in steps:
            while len(storage) < n:
                add_storage()
            if n != steps[0]:
                if n == steps[-1]:  # measure foreground reads while this rebalance runs
                    before = read_mbps()
                    done = threading.Event()
                    samples: list[float] = []

                    def fg(done: threading.Event = done, samples: list[float] = samples) -> None:
                        while not done.is_set():
                            samples.append(read_mbps())

                    t = threading.Thread(target=fg)
                    t.start()
                    cli("pool", "rebalance", "--wait", "--json", "--max-rate", args.rebalance_rate, meta=meta)
                    done.set()
                    t.join()
                    mean = sum(samples) / len(samples) if samples else 0.0
                    during = {"before_MBps": before, "during_MBps": round(mean, 1), "fraction": round(mean / before, 2),
                              "max_rate": args.rebalance_rate}
                else:
                    cli("pool", "rebalance", "--wait", "--json", meta=meta)
            info = json.loads(cli("volume", "show", "vol", "--json", meta=meta))
            mbps = read_mbps()
            results.append({"hosts": n, "width": info["stripe_width"], "MBps": mbps})
            print(f"{n} storage hosts (volume width {info['stripe_width']}): {mbps:.1f} MB/s", file=sys.stderr)
        base = results[0]["MBps"] / results[0]["hosts"]
        for r in results:
            r["efficiency"] = round(r["MBps"] / (r["hosts"] * base), 3)
        report = {"rate_per_host": args.rate, "results": results, "during_rebalance": during}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"\nscale-out, each storage host limited to {args.rate} egress, volume {args.size}")
            print(f"{'hosts':>5} {'width':>5} {'MB/s':>8} {'efficiency':>10}")
            for r in results:
                print(f"{r['hosts']:>5} {r['width']:>5} {r['MBps']:>8.1f} {r['efficiency']:>10.3f}   (goal >= 0.9 at 8)")
            if during:
                print(f"foreground reads during the last rebalance (--max-rate {during['max_rate']}): "
                      f"{during['during_MBps']:.1f} MB/s = {during['fraction']:.2f} of {during['before_MBps']:.1f} MB/s before")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        fabric.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
