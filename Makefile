# The two commands a new user types (as root, on Debian 12):
#   make demo   installs what is missing, builds, runs loopback TCP vs the bypass
#   make test   installs what is missing, builds, runs the whole test suite
#   make conformance  the conformance suite alone (a part of make test), with its table
VENV := .venv
PY := $(VENV)/bin/python

demo: setup
	$(PY) -m shmbypass bench --quick

# The test process joins the bypass group itself, so it is given the same
# guard `shmbypass run` gives every program (native/guard.c).
test: setup
	LD_PRELOAD=$(CURDIR)/shmbypass/_bin/libshmbypass-guard.so $(PY) -m pytest tests

# The differential conformance suite alone (docs/CONFORMANCE.md): every
# scenario under loopback TCP, the kernel tier and the shm tier, then a table.
conformance: setup
	LD_PRELOAD=$(CURDIR)/shmbypass/_bin/libshmbypass-guard.so $(PY) -m pytest tests/conformance -q

setup:
	@bash scripts/setup.sh

bench: setup
	$(PY) -m shmbypass bench --out bench/results

clean:
	rm -rf build shmbypass/_bpf shmbypass/_bin shmbypass/_native*.so shmbypass/_native.c *.egg-info

.PHONY: demo test conformance setup bench clean
