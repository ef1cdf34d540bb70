#!/usr/bin/env bash
# The test command: installs what is missing, runs ruff and mypy, then the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/bootstrap.sh
# Quality gates first (fast, and a failure fails CI): lint, then strict typing of the whole tree.
echo "test: ruff check" >&2
.venv/bin/ruff check --no-cache .
echo "test: mypy (strict, whole tree, tests included)" >&2
.venv/bin/mypy --no-incremental
# PYTHONFAULTHANDLER: a crash of the test process, even while the interpreter shuts down after the last
# test, prints every thread's stack (one run in four here ended in a segfault at exit after all tests passed)
export PYTHONFAULTHANDLER=1
.venv/bin/python -m pytest -p no:cacheprovider "$@"
# The data plane has a compiled hot path (agents/_cserve.c with the agents' connection threads, proto/_ccomplete.c,
# client/nbd/_cnbd.c, client/_csync.c) and a pure-Python reference; the run above used the compiled one. Without arguments, the data-plane tests run once more
# on the reference (NVPOOL_PURE_PYTHON=1, which agents started by the tests inherit).
if [ $# -eq 0 ]; then
  echo "test: the data-plane tests again on the pure-Python reference (NVPOOL_PURE_PYTHON=1)" >&2
  NVPOOL_PURE_PYTHON=1 exec .venv/bin/python -m pytest -p no:cacheprovider -q \
    tests/test_dataplane_codec.py tests/test_agent.py tests/test_agent_hostile.py tests/test_transports.py \
    tests/test_client_faults.py tests/test_capabilities.py tests/test_data_safety.py tests/test_full_drive.py \
    tests/test_nbd_hostile.py tests/test_nbd.py tests/test_nbd_engine.py tests/test_scrub.py
fi
