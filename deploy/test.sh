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
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
