"""``nvpool mount`` / ``nvpool unmount``: a volume as a mounted file system.

Steps (each recorded in a state file under ``$NVPOOL_RUN_DIR/mounts`` (default /run/nvpool) as soon
as it is done, so ``unmount``, or a failure half-way, undoes exactly what was done, in reverse):

1. ``export``: a background ``nvpool export VOLUME --socket ...`` process (unless ``--socket`` names
   an export that already runs);
2. a block device: the kernel NBD client (``nbd-client``) where ``/dev/nbd*`` exists, otherwise
   ``nbdfuse`` (the export as a file in a FUSE mount) plus a loop device (``losetup``);
3. optionally ``mkfs`` (ext4, xfs);
4. ``mount``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from nvpool.proto.errors import NvpoolError, UnavailableError, UsageError

logger = logging.getLogger(__name__)


def run_dir() -> Path:
    return Path(os.environ.get("NVPOOL_RUN_DIR", "/run/nvpool"))


def _state_path(mountpoint: str) -> Path:
    key = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return run_dir() / "mounts" / f"{key}.json"


def _run(argv: list[str], timeout: float = 120) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UnavailableError(f"{argv[0]} is not installed") from None
    if p.returncode != 0:
        raise NvpoolError(f"{' '.join(argv)} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout.strip()


def _save(state: dict[str, Any]) -> None:
    path = Path(state["state_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _wait_for(cond: Any, what: str, timeout: float = 30, proc: Optional[subprocess.Popen[bytes]] = None,
              log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:  # poll() also reaps: a zombie is not "alive"
            said = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
            raise UnavailableError(f"{what} failed: {said[0] if said else f'exit status {proc.returncode}'}")
        time.sleep(0.05)
    raise UnavailableError(f"{what}: timed out after {timeout:.0f}s")


def kernel_nbd_available() -> bool:
    return bool(glob.glob("/dev/nbd[0-9]*")) and shutil.which("nbd-client") is not None


def start_export(volume: str, meta: Optional[str], socket_path: str, read_only: bool, force: bool = False) -> int:
    ready = socket_path + ".ready"
    if os.path.exists(ready):
        os.unlink(ready)
    log_path = run_dir() / "logs" / f"export-{volume}.log"
    log = open(log_path, "ab")
    argv = [sys.executable, "-m", "nvpool", "export", volume, "--socket", socket_path, "--ready-file", ready]
    if meta:
        argv += ["--meta", meta]
    if read_only:
        argv.append("--read-only")
    if force:
        argv.append("--force")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
    log.close()
    _wait_for(lambda: os.path.exists(ready), f"export of {volume}", proc=proc, log=log_path)
    return proc.pid


def mount(volume: str, mountpoint: str, meta: Optional[str] = None, mkfs: Optional[str] = None,
          read_only: bool = False, socket_path: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    if mkfs and read_only:
        raise UsageError("--mkfs needs a writable mount")
    if mkfs and mkfs not in ("ext4", "xfs"):
        raise UsageError(f"unsupported file system {mkfs!r} (ext4, xfs)")
    state_file = _state_path(mountpoint)
    if state_file.exists():
        raise UsageError(f"{mountpoint} is already mounted by nvpool (nvpool unmount {mountpoint})")
    for sub in ("mounts", "logs", "exports", "fuse"):
        (run_dir() / sub).mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"volume": volume, "mountpoint": os.path.abspath(mountpoint), "steps": [],
                             "state_file": str(state_file)}
    try:
        if socket_path is None:
            socket_path = str(run_dir() / "exports" / f"{volume}-{os.getpid()}.sock")
            pid = start_export(volume, meta, socket_path, read_only, force)
            state["steps"].append({"kind": "export", "pid": pid, "socket": socket_path})
            _save(state)
        if kernel_nbd_available():
            dev = _free_nbd_device()
            argv = ["nbd-client", "-unix", socket_path, dev, "-N", volume]
            _run(argv + (["-readonly"] if read_only else []))
            state["steps"].append({"kind": "nbd", "device": dev})
        else:
            fuse_dir = run_dir() / "fuse" / hashlib.sha1(state["mountpoint"].encode()).hexdigest()[:12]
            fuse_dir.mkdir(parents=True, exist_ok=True)
            disk = fuse_dir / "disk"
            argv = ["nbdfuse"] + (["-r"] if read_only else []) + [str(disk), "--unix", socket_path]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            state["steps"].append({"kind": "fuse", "dir": str(fuse_dir), "pid": proc.pid})
            _save(state)
            _wait_for(lambda: disk.exists() and os.stat(disk).st_size > 0, "nbdfuse", proc=proc)
            dev = _run(["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(disk)])
            state["steps"].append({"kind": "loop", "device": dev})
        _save(state)
        if mkfs:
            _run([f"mkfs.{mkfs}", "-q", "-F" if mkfs == "ext4" else "-f", dev], timeout=600)
        os.makedirs(mountpoint, exist_ok=True)
        _run(["mount"] + (["-o", "ro"] if read_only else []) + [dev, state["mountpoint"]])
        state["steps"].append({"kind": "mount", "path": state["mountpoint"]})
        state["device"] = dev
        _save(state)
        return state
    except BaseException:
        logger.warning("mount of %s failed; undoing %d step(s)", volume, len(state["steps"]))
        _undo(state)
        raise


def _free_nbd_device() -> str:
    for dev in sorted(glob.glob("/dev/nbd[0-9]*"), key=lambda d: int(d[8:])):
        size = Path(f"/sys/block/{os.path.basename(dev)}/size")
        if size.exists() and size.read_text().strip() == "0":
            return dev
    raise UnavailableError("no free /dev/nbd device")


def _undo(state: dict[str, Any]) -> list[str]:
    """Undo recorded steps in reverse; returns the problems met (and carries on past them)."""
    problems = []
    for step in reversed(state["steps"]):
        try:
            kind = step["kind"]
            if kind == "mount":
                _run(["umount", step["path"]])
            elif kind == "loop":
                _run(["losetup", "-d", step["device"]])
            elif kind == "nbd":
                _run(["nbd-client", "-d", step["device"]])
            elif kind == "fuse":
                disk_dir = step["dir"]
                if os.path.ismount(disk_dir) or os.path.exists(os.path.join(disk_dir, "disk")):
                    subprocess.run(["fusermount3", "-u", disk_dir], capture_output=True)
                _stop(step["pid"])
            elif kind == "export":
                _stop(step["pid"])
        except NvpoolError as exc:
            problems.append(str(exc))
    sf = Path(state["state_file"])
    if not problems and sf.exists():
        sf.unlink()
    return problems


def _stop(pid: int, timeout: float = 10) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def unmount(mountpoint: str) -> None:
    sf = _state_path(mountpoint)
    if not sf.exists():
        raise UsageError(f"{mountpoint} is not mounted by nvpool")
    problems = _undo(json.loads(sf.read_text()))
    if problems:
        raise NvpoolError("unmount left some steps undone: " + "; ".join(problems))
