#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/bootstrap.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
