#!/usr/bin/env bash
# Install what nvpool needs on a fresh Debian/Ubuntu machine: Debian packages (when missing) and a
# virtual environment in ./.venv with nvpool installed in editable mode. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Third-party NBD clients and tools the tests and benchmarks use (see README), and etcd (the tests start
# their own etcd clusters on loopback ports; the package's own service is left as Debian sets it up).
need=()
for pair in fio:fio nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin \
            qemu-img:qemu-utils nbd-client:nbd-client fusermount3:fuse3 mkfs.ext4:e2fsprogs \
            losetup:mount etcd:etcd-server; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [[ " ${need[*]:-} " == *" $pkg "* ]] || need+=("$pkg")
done
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing Debian packages: ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.nvpool-installed
# Rebuild when the project's metadata or any compiled hot-path source (C, built by this install with the
# machine's compiler) is newer than the last install.
stale=0
[ -f "$stamp" ] || stale=1
for src in pyproject.toml agents/*.c proto/*.c client/*.c client/*/*.c; do
  [ -f "$src" ] && [ "$src" -nt "$stamp" ] && stale=1
done
if [ "$stale" -eq 1 ]; then
  echo "bootstrap: installing nvpool and its dependencies into .venv" >&2
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test,etcd]'; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "bootstrap: pip install failed" >&2; exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
