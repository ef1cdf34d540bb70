"""Bounded waits for tests: poll a condition, or a ready file a daemon writes. Never a bare sleep."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def poll(what: str, fn: Callable[[], T], timeout: float = 30, interval: float = 0.1,
         ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``fn`` until it returns something true (which is returned), for at most ``timeout`` s;
    exceptions of the ``ignore`` types count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
            if got:
                return got
        except ignore:
            pass
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_json(path: Path, proc: "subprocess.Popen[Any]", timeout: float = 30) -> dict[str, Any]:
    """The JSON a daemon writes to its ready file; fails at once if the daemon exits first."""
    def ready() -> dict[str, Any]:
        assert proc.poll() is None, f"process exited: {proc.args!r}"
        try:
            return dict(json.loads(path.read_text())) if path.exists() else {}
        except ValueError:
            return {}

    return poll(f"{path} to be written", ready, timeout, 0.05)


def stop_all(procs: "list[subprocess.Popen[Any]]", timeout: float = 10) -> None:
    """Terminate processes a test started; kill any that do not exit within ``timeout``."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
