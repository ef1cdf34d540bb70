"""The deployment files are checked by the tools made for them: the systemd units with
`systemd-analyze verify` (against this checkout's own `nvpool`), the Kubernetes manifests against the
Kubernetes API schemas (kubernetes-validate), and the shell completion generated from the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["nvpool-meta.service", "nvpool-agent.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    nvpool = Path(sys.executable).parent / "nvpool"
    text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/nvpool/.venv/bin/nvpool", str(nvpool))
    (tmp_path / unit).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)], capture_output=True,
                       text=True, timeout=60)
    # no output at all: an unknown key or section is only a warning (exit 0) but a mistake all the same
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    sysusers = (DEPLOY / "systemd" / "nvpool.sysusers").read_text()
    assert "u nvpool" in sysusers and "User=nvpool" in (DEPLOY / "systemd" / "nvpool-meta.service").read_text()


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.29.0",
                        str(DEPLOY / "kubernetes" / "nvpool.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DEPLOY / "kubernetes" / "nvpool.yaml").read_text()
    for want in ("readinessProbe", "livenessProbe", "resources", "runAsNonRoot", "nvpool-join-secret", "nvpool-tls"):
        assert want in text, want


def test_bash_completion_knows_the_commands(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nvpool", "completion", "bash"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("volume", "replicas", "failure-domain", "drain", "certs", "health"):
        assert word in r.stdout, word
    script = tmp_path / "c.sh"
    script.write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0


def test_man_page_is_made_from_the_cli(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nvpool", "man"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(".TH NVPOOL"), r.stderr
    for word in ("volume", "replicas", "certs", "drive"):
        assert word in r.stdout, word
    if shutil.which("groff"):
        g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=r.stdout, capture_output=True, text=True,
                           timeout=60)
        assert g.returncode == 0, g.stderr


def test_grafana_dashboard_queries_only_metrics_we_export() -> None:
    import json
    import re

    dash = json.loads((DEPLOY / "grafana" / "nvpool-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b(nvpool_[a-z_]+)", e)}
    source = "".join((ROOT / d).joinpath(f).read_text() for d, f in (("agents", "metrics.py"), ("pool", "metrics.py"),
                                                                       ("client", "metrics.py")))
    for name in names:  # every metric the dashboard uses is one a collector defines
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in source, name


def test_deployment_files_give_the_daemons_what_they_need(tmp_path: Path) -> None:
    """Issue 30, the first hour, 10: what a deployment from these files met, checked without a cluster."""
    import os
    import yaml  # type: ignore[import-untyped]

    import nvpool
    from nvpool.client.nbd.mounting import run_dir
    from nvpool.proto import keys
    from nvpool.proto.errors import UsageError

    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "nvpool.yaml").read_text()) if d]
    # every image is this version's
    images = [c["image"] for d in docs if d.get("spec", {}).get("template")
              for c in d["spec"]["template"]["spec"]["containers"]]
    assert images and all(i == f"nvpool:{nvpool.__version__}" for i in images), images
    # a non-root metadata pod can read its secrets: mounted for its group, and nvpool takes group-readable
    meta = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    uid = meta["containers"][0]["securityContext"]["runAsUser"]
    assert meta["securityContext"]["fsGroup"] == uid
    for v in meta["volumes"]:
        if "secret" in v:
            assert v["secret"]["defaultMode"] & 0o040, v  # group-readable
    secret = tmp_path / "secret"
    keys.create(str(secret))
    os.chmod(secret, 0o440)
    assert keys.load(str(secret))
    for bad in (0o444, 0o460, 0o640 | 0o004):
        os.chmod(secret, bad)
        with pytest.raises(UsageError, match="open to others"):
            keys.load(str(secret))
    # stopping the agent must not wipe what `nvpool mount` keeps in /run/nvpool
    unit = (DEPLOY / "systemd" / "nvpool-agent.service").read_text()
    if "RuntimeDirectory=nvpool\n" in unit:
        assert "RuntimeDirectoryPreserve=yes" in unit
    assert str(run_dir()) == "/run/nvpool" or os.environ.get("NVPOOL_RUN_DIR")
    # the image carries the compiled hot paths, or its build fails saying so
    cf = (DEPLOY / "Containerfile").read_text()
    assert "AS build" in cf and "gcc" in cf.split("AS build", 1)[1].split("FROM", 1)[0]
    assert "compiled.status()" in cf and "sys.exit" in cf
