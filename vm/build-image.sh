#!/bin/sh
# Build (or find in the cache) the guest kernel + initramfs for the VM pair,
# from Debian packages only: linux-image-amd64's kernel package (apt-get
# download), busybox-static (installed). Output: build/vm/<pkg>_<version>-<hash>/.
# Usage: vm/build-image.sh [--force]
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m shmbypass.vm build "$@"
