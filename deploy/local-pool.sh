#!/usr/bin/env bash
# Start a real local pool (metadata service + 4 agents x 2 file-backed drives on 127.0.0.1) and run
# the end-to-end demo: create a volume, write random data across many stripes, read it back, compare.
# The pool keeps running afterwards; stop it with: .venv/bin/nvpool cluster down --dir .nvpool/local
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/bootstrap.sh
DIR=${NVPOOL_HOME:-.nvpool/local}
if [ -f "$DIR/cluster.json" ]; then .venv/bin/nvpool cluster down --dir "$DIR" 2>/dev/null || true; fi
.venv/bin/nvpool cluster up --dir "$DIR" --agents "${AGENTS:-4}" --drives-per-agent 2 --drive-size 4G
.venv/bin/nvpool cluster demo --dir "$DIR" --size "${DEMO_SIZE:-1G}"
eval "$(.venv/bin/nvpool cluster env --dir "$DIR")"
.venv/bin/nvpool pool status
