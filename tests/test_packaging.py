"""One installable package: a non-editable install puts only ``nvpool`` into site-packages, so nvpool
lives beside ``proto-plus`` (import name ``proto``) and beside a training repo's own ``client.py``."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A non-editable install of a copy of the tree (building in place would leave build/ behind)."""
    src = tmp_path_factory.mktemp("src") / "nvpool"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".nvpool", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", "*.so"))
    target = tmp_path_factory.mktemp("site")
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return target


def run_isolated(target: pathlib.Path, cwd: pathlib.Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` seeing only the installed copy and the dependencies: no site hooks (so no editable
    finder of the development checkout), the checkout not on the path, a clean working directory."""
    deps = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "NVPOOL_PURE_PYTHON"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), deps])
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_only_nvpool_is_installed(installed: pathlib.Path) -> None:
    top = sorted(p.name for p in installed.iterdir() if p.name not in ("bin",))
    assert [t for t in top if not t.endswith(".dist-info")] == ["nvpool"], top
    for layer in ("pool", "proto", "agents", "client"):
        assert (installed / "nvpool" / layer / "__init__.py").is_file()
        assert (installed / "nvpool" / layer / "py.typed").is_file()
    assert (installed / "nvpool" / "proto" / "nvpool.proto").is_file()
    assert (installed / "bin" / "nvpool").is_file()


def test_install_builds_the_compiled_hot_path(installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The install compiles the C hot path with the machine's compiler (the copy carried no .so), and
    the installed agent's command loop uses it unless NVPOOL_PURE_PYTHON says otherwise."""
    assert list((installed / "nvpool" / "agents").glob("_cserve*.so")), "the C extension was not built"
    code = (
        "import nvpool.agents.dataplane as d, nvpool.proto.compiled as c\n"
        "print(d._cserve is not None, c.status()['nvpool.agents._cserve'])\n"
    )
    p = run_isolated(installed, tmp_path, code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "compiled"], p.stdout
    env_code = "import os; os.environ['NVPOOL_PURE_PYTHON'] = '1'\n" + code
    p = run_isolated(installed, tmp_path, env_code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "False", p.stdout


def test_installed_package_imports_and_old_names_do_not(installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    code = (
        "import nvpool, nvpool.client, nvpool.pool.grpc_meta, nvpool.agents.agent\n"
        "assert nvpool.client.__file__.startswith(%r), nvpool.client.__file__\n"
        "print(nvpool.__version__)\n"
    ) % str(installed)
    p = run_isolated(installed, tmp_path, code)
    assert p.returncode == 0, p.stderr
    import nvpool

    assert p.stdout.strip() == nvpool.__version__
    for old in ("client", "pool", "agents"):
        p = run_isolated(installed, tmp_path, f"import {old}")
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, (old, p.stderr)


def test_beside_proto_plus_and_a_local_client_module(installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``proto`` is proto-plus's import name (every google-cloud library pulls it in), and a training repo
    often has its own ``client.py``: both keep working, and so does nvpool."""
    (tmp_path / "client.py").write_text("WHO = 'the training repo'\n")
    code = (
        "import proto, client, nvpool.client, nvpool.proto.dataplane\n"
        "assert hasattr(proto, 'Message'), proto.__file__\n"
        "assert client.WHO == 'the training repo'\n"
        "assert nvpool.client.connect\n"
    )
    p = run_isolated(installed, tmp_path, code)
    assert p.returncode == 0, p.stderr


def test_version_flag() -> None:
    import nvpool

    env = {k: v for k, v in os.environ.items() if k != "NVPOOL_PURE_PYTHON"}
    p = subprocess.run([sys.executable, "-m", "nvpool", "--version"], capture_output=True, text=True, timeout=60,
                       env=env)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[0] == f"nvpool {nvpool.__version__}", p.stdout + p.stderr
    # the second line names the data plane's implementation: compiled here (the test command builds it)
    assert lines[1] == "data plane: agents._cserve compiled, proto._ccomplete compiled, client.nbd._cnbd compiled, client._csync compiled", p.stdout
    env = {**os.environ, "NVPOOL_PURE_PYTHON": "1"}
    p = subprocess.run([sys.executable, "-m", "nvpool", "--version"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 0 and "disabled (NVPOOL_PURE_PYTHON)" in p.stdout.splitlines()[1], p.stdout
