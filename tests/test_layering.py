"""The layering the architecture promises, checked on the source tree itself (asyncpg's
``tests/test__sourcecode.py`` is the model): each layer is imported in a fresh interpreter and the test
fails if a module that layer must not use shows up in ``sys.modules``.

* ``nvpool.proto`` (the shared wire package) is the bottom: it never loads ``pool``, ``agents`` or
  ``client``; its codec and records load no generated gRPC code either.
* ``nvpool.agents`` never loads the client library.
* ``nvpool.pool`` never loads the agent or the client.
* The domain cores (metadata core, placement, migration, rebalancer, replication; agent core, drives) load no
  generated ``_pb2`` module and no gRPC: only the gRPC edges convert protobuf.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

GENERATED = ("nvpool.proto.nvpool_pb2", "nvpool.proto.nvpool_pb2_grpc", "grpc", "google.protobuf")

CASES: list[tuple[list[str], tuple[str, ...]]] = [
    # the wire package on its own
    (["nvpool.proto.dataplane", "nvpool.proto.layout", "nvpool.proto.records", "nvpool.proto.units",
      "nvpool.proto.capability", "nvpool.proto.keys", "nvpool.proto.tls", "nvpool.proto.metrics",
      "nvpool.proto.errors", "nvpool.proto.transport", "nvpool.proto.config", "nvpool.proto.addresses",
      "nvpool.proto.compiled", "nvpool.proto.blocksums"],
     ("nvpool.pool", "nvpool.agents", "nvpool.client", *GENERATED)),
    (["nvpool.proto.convert", "nvpool.proto.generate", "nvpool.proto.grpctls"],
     ("nvpool.pool", "nvpool.agents", "nvpool.client")),
    # the whole agent daemon, gRPC edge included
    (["nvpool.agents.agent", "nvpool.agents.control", "nvpool.agents.copy", "nvpool.agents.shm",
      "nvpool.agents.metrics"],
     ("nvpool.client", "nvpool.pool")),
    # the agent core and drives
    (["nvpool.agents.core", "nvpool.agents.drive", "nvpool.agents.dataplane", "nvpool.agents.osio",
      "nvpool.agents.intent", "nvpool.agents.checksums"],
     ("nvpool.client", "nvpool.pool", *GENERATED)),
    # the whole metadata service, gRPC edge included
    (["nvpool.pool.grpc_meta", "nvpool.pool.metrics"], ("nvpool.client", "nvpool.agents")),
    # the metadata core
    (["nvpool.pool.meta", "nvpool.pool.planner", "nvpool.pool.migration", "nvpool.pool.rebalancer",
      "nvpool.pool.replication", "nvpool.pool.scrub",
      "nvpool.pool.kvstore"],
     ("nvpool.client", "nvpool.agents", "nvpool.pool.etcdstore", "aetcd", *GENERATED)),
    # the etcd store: an edge of its own (etcd's gRPC API, through aetcd), never nvpool's generated code
    (["nvpool.pool.etcdstore"],
     ("nvpool.client", "nvpool.agents", "nvpool.proto.nvpool_pb2", "nvpool.proto.nvpool_pb2_grpc")),
    # the NBD protocol codec is sans-IO: no event loop, no client library, no gRPC (the client package
    # imports its library lazily for this)
    (["nvpool.client.nbd.proto"], ("nvpool.pool", "nvpool.agents", "nvpool.client.api", "nvpool.client.volume",
                                   "asyncio", "numpy", *GENERATED)),
    # `import nvpool` is cheap: it loads none of the layers
    (["nvpool"], ("nvpool.pool", "nvpool.agents", "nvpool.client", "nvpool.proto", "numpy", "grpc")),
]


def loaded_after_import(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


@pytest.mark.parametrize("modules,forbidden", CASES, ids=[c[0][0] for c in CASES])
def test_layer_does_not_load_forbidden_modules(modules: list[str], forbidden: tuple[str, ...]) -> None:
    loaded = loaded_after_import(modules)
    bad = sorted(m for m in loaded for f in forbidden if m == f or m.startswith(f + "."))
    assert not bad, f"importing {modules} loaded {bad}"


def test_the_checker_sees_a_violation() -> None:
    """The check can fail: the client library does load the wire package and gRPC."""
    loaded = loaded_after_import(["nvpool.client.api"])
    assert "nvpool.proto.dataplane" in loaded and "grpc" in loaded


def test_every_module_is_covered_or_an_edge() -> None:
    """A new module in a core layer must be placed in CASES (or listed here as an edge)."""
    covered = {m for mods, _ in CASES for m in mods}
    edges = {"nvpool.pool.agentlink", "nvpool.pool.grpc_meta"}
    for layer in ("proto", "agents", "pool"):
        for path in (ROOT / layer).glob("*.py"):
            name = f"nvpool.{layer}.{path.stem}"
            if path.stem in ("__init__", "nvpool_pb2", "nvpool_pb2_grpc"):
                continue
            assert name in covered or name in edges, f"{name} is not checked by tests/test_layering.py"


def test_no_top_level_imports_of_the_old_names() -> None:
    """Nothing imports the folders by their tree names (``import client``): only ``nvpool.*`` is installed."""
    import re

    pat = re.compile(r"^\s*(from|import)\s+(client|proto|pool|agents)\b", re.M)
    offenders = []
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in ("pool", "proto", "agents", "client", "tests", "deploy", "nvpool"):
            if pat.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
