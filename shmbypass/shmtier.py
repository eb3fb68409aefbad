"""The shm tier for unmodified programs: the environment that loads the
interposer (native/preload/, built as _bin/libshmbypass-preload.so).

`shmbypass run --tier shm -- CMD` runs CMD with :func:`preload_env`. The
library asks for the shm tier on the program's TCP sockets (ask.py); when
BPF pairs both ends, the passive end offers memory it made for its peer
(one host: no region) and the payload moves through rings there. Toward a
peer VM (`up --vm-peer`) the rings are slots of the pair's region, named by
SHMBYPASS_REGION.

Environment the library reads:

``SHMBYPASS_INSTANCE``  the instance (pin dir /sys/fs/bpf/<instance>)
``SHMBYPASS_REGION``    a VM pair's region, ``<backend>:<path>``: ``posix:/<name>``
                        (POSIX shm, the VM path on one host) or
                        ``ivshmem:<BAR2 file>``
``SHMBYPASS_DEBUG=1``   one line on stderr per decision (tier, fallback reason)
``SHMBYPASS_SPIN_NS``   spin budget of a blocking call before it sleeps (the
                        ring's adaptive spin, default 30000)
``SHMBYPASS_EPOLL_SPIN_NS``  upper bound of the poll/select/epoll spin (default
                        50000; the spin follows how long waits take, 0 = never)
``SHMBYPASS_DISABLE=1`` pure pass-through
``SHMBYPASS_PRELOAD``   (here) use another build of the library, e.g. a
                        sanitizer build, or the test build with the hooks the
                        tests use (_bin/libshmbypass-preload-test.so)
"""
import os

from shmbypass import paths

LIBRARY = "libshmbypass-preload.so"


def library_path() -> str:
    return os.environ.get("SHMBYPASS_PRELOAD") or paths.tool(LIBRARY)


def region_spec(inst: paths.Instance) -> str | None:
    """``<backend>:<path>`` of a VM pair's region, or None: one-host
    connections need no region (each pair of processes brings its own
    memory), only the VM-pair path does (`up --backend ivshmem`, or
    `--vm-peer` with a POSIX region on one host, for tests).

    An explicit SHMBYPASS_REGION in our environment wins (tests, experts)."""
    explicit = os.environ.get("SHMBYPASS_REGION")
    if explicit:
        return explicit
    state = inst.load_state()
    region = state.get("region")
    if not isinstance(region, dict) or not (region.get("backend") == "ivshmem" or state.get("vm_peers")):
        return None
    backend, path = region.get("backend"), region.get("path")
    if not backend or not path:
        return None
    if backend == "posix" and not path.startswith("/"):
        path = "/" + path
    return f"{backend}:{path}"


def preload_env(inst: paths.Instance) -> dict:
    """Environment for `shmbypass run --tier shm`: LD_PRELOAD (after any
    preload already set, so a sanitizer runtime stays first), the instance,
    and the region."""
    lib = library_path()
    if not os.path.exists(lib):
        raise FileNotFoundError(f"{lib} is not built (run setup.py build_ext or make -C native)")
    preload = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if lib not in preload:
        preload.append(lib)
    env = {"LD_PRELOAD": " ".join(preload), "SHMBYPASS_INSTANCE": inst.name}
    spec = region_spec(inst)
    if spec:
        env["SHMBYPASS_REGION"] = spec
    return env
