#!/bin/bash
# Install what is missing (Debian packages, then a venv with the Python
# packages from PyPI) and build the project. Idempotent: a second run only
# checks stamps and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "shmbypass setup: must run as root (it installs Debian packages and loads BPF programs)" >&2
    exit 1
fi

# System packages. Each line says why it is here.
APT_PKGS=(
    clang-19 llvm-19      # compile bpf/*.bpf.c
    libbpf-dev            # the BPF loader (libbpf1) and its headers
    bpftool               # vmlinux.h from the running kernel's BTF
    make gcc pkg-config   # native build
    python3-venv python3-dev
    iproute2              # network namespaces in tests (driven through pyroute2)
    redis-server redis-tools   # real application tests
    nginx-light curl wrk haproxy iperf3   # real applications and the sidecar bench
    qemu-system-x86 busybox-static   # the IVSHMEM VM pair (vm/, tests/test_vm.py); guest kernel via apt-get download
    prometheus            # a real server scrapes `shmbypass metrics` (tests/test_metrics.py)
    tshark tcpdump        # read back the pcapng files shmbypass/pcap.py writes (tests/test_pcap.py)
)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "shmbypass setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts packaged daemons; the tests start their own copies.
    for svc in redis-server nginx haproxy prometheus; do
        systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
    done
fi

# Python packages, in a venv of our own. pip also runs the first build.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ ! -f .venv/.deps-stamp ] || [ pyproject.toml -nt .venv/.deps-stamp ]; then
    .venv/bin/pip install -q --upgrade pip setuptools wheel cffi
    .venv/bin/pip install -q --no-build-isolation -e '.[test]'
    touch .venv/.deps-stamp
fi

# Rebuild what changed (BPF objects, cffi module, preload library, C tools);
# the makefiles underneath skip what is up to date.
.venv/bin/python setup.py -q build_ext --inplace
