"""The README's quick start and Python API blocks run as written, against a real local pool laid out
where the quick start puts it (``.nvpool/local`` under the working directory, ``.venv`` beside it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def blocks(section: str, lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else len(text)]
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def test_blocks_are_found() -> None:
    assert len(blocks("Quick start", "sh")) == 2
    assert len(blocks("Python API", "python")) == 4
    assert len(blocks("Surviving a dead server", "sh")) == 1


def test_quick_start_and_python_api_run_as_written(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    (tmp_path / ".venv").symlink_to(venv)
    env = {k: v for k, v in os.environ.items() if k not in ("NVPOOL_META", "NVPOOL_TLS")}
    nv = [str(venv / "bin" / "nvpool")]
    up = subprocess.run([*nv, "cluster", "up", "--dir", ".nvpool/local", "--agents", "4", "--drives-per-agent", "2",
                         "--drive-size", "1G"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        shell = blocks("Quick start", "sh")[1]
        p = subprocess.run(["bash", "-euo", "pipefail", "-c",
                            shell + '\necho "NVPOOL_META=$NVPOOL_META"\necho "NVPOOL_TLS=${NVPOOL_TLS:-}"\n'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        meta = re.findall(r"^NVPOOL_META=(\S+)$", p.stdout, flags=re.M)
        assert meta and meta[0].startswith("127.0.0.1:"), p.stdout
        assert "MB/s" in p.stdout
        env["NVPOOL_META"] = meta[0]
        tls = re.findall(r"^NVPOOL_TLS=(\S*)$", p.stdout, flags=re.M)
        assert tls and tls[0], "the quick start's `cluster env` did not export NVPOOL_TLS"
        env["NVPOOL_TLS"] = tls[0]  # as the quick start's eval set it
        for i, code in enumerate(blocks("Python API", "python")):
            for attempt in range(2):  # each block is also safe to run a second time
                r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                   text=True, timeout=120)
                assert r.returncode == 0, f"Python API block {i} (run {attempt + 1}):\n{code}\n{r.stderr}"
        # the replication section's commands fit this pool and name no volume the blocks above use
        # (issue 30, the first hour, 11)
        shell = blocks("Surviving a dead server", "sh")[0]
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], cwd=tmp_path, capture_output=True, text=True,
                           timeout=180, env={**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
        assert r.returncode == 0, f"{shell}\n{r.stdout}\n{r.stderr}"
        assert "0 checksum errors" in r.stdout
    finally:
        down = subprocess.run([*nv, "cluster", "down", "--dir", ".nvpool/local"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
