"""libbpf through cffi: open/load objects, pin, attach, and typed map access.

Every libbpf failure becomes an OSError naming the step that failed; a load
failure carries libbpf's log (the verifier's explanation included).
"""
import os

from shmbypass._native import ffi, lib
from shmbypass.errors import oserror

lib.sbp_libbpf_capture()


def libbpf_log() -> str:
    return ffi.string(lib.sbp_libbpf_log()).decode(errors="replace")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise oserror(ret if ret != -1 else -ffi.errno, what)
    return ret


class LoadError(OSError):
    """The kernel refused a program; .log has libbpf's/verifier's output."""

    def __init__(self, err: int, what: str, log: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


class BpfObject:
    """One compiled .bpf.o, opened and loaded into the kernel."""

    def __init__(self, path: str, skip_programs: tuple[str, ...] = ()):
        if not os.path.exists(path):
            raise FileNotFoundError(f"BPF object {path} is missing (run `make setup`)")
        lib.sbp_libbpf_log_clear()
        obj = lib.bpf_object__open_file(path.encode(), ffi.NULL)
        err = lib.libbpf_get_error(obj)
        if err:
            raise LoadError(-err, f"open {os.path.basename(path)}", libbpf_log())
        self._obj = obj
        for name in skip_programs:
            lib.bpf_program__set_autoload(self._prog(name), False)

    def reuse_map(self, name: str, pin_path: str) -> None:
        """Use an existing (pinned) map for this object's map `name`."""
        fd = get_pinned(pin_path)
        try:
            _check(lib.bpf_map__reuse_fd(self._map(name), fd), f"reuse map {name}")
        finally:
            os.close(fd)  # libbpf keeps its own dup

    def set_max_entries(self, name: str, n: int) -> None:
        """Size a map of this object before load (e.g. a ring buffer's bytes)."""
        _check(lib.bpf_map__set_max_entries(self._map(name), n), f"size map {name}")

    def load(self) -> None:
        lib.sbp_libbpf_log_clear()
        err = lib.bpf_object__load(self._obj)
        if err:
            raise LoadError(-err, "load BPF programs", libbpf_log())

    def _prog(self, name: str):
        prog = lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == ffi.NULL:
            raise KeyError(f"no BPF program {name}")
        return prog

    def _map(self, name: str):
        m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if m == ffi.NULL:
            raise KeyError(f"no BPF map {name}")
        return m

    def prog_fd(self, name: str) -> int:
        return _check(lib.bpf_program__fd(self._prog(name)), f"program {name}")

    def map_fd(self, name: str) -> int:
        return _check(lib.bpf_map__fd(self._map(name)), f"map {name}")

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pin(fd: int, path: str) -> None:
    _check(lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def get_pinned(path: str, readonly: bool = False) -> int:
    """fd of a pinned object; FileNotFoundError if the pin is absent."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    fd = lib.bpf_obj_get(path.encode())
    return _check(fd, f"open pin {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(lib.sbp_link_create(prog_fd, target_fd, attach_type), "create link")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach program")


def iter_read(prog_fd: int, map_fd: int = -1) -> bytes:
    """Run an iterator program (over map_fd for a map iterator) and return
    what it wrote."""
    link = ffi.new("int *")
    fd = _check(lib.sbp_iter_open(prog_fd, map_fd, link), "create iterator")
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
        os.close(link[0])


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class Map:
    """A BPF map by fd, with key/value types named as cffi C types."""

    def __init__(self, fd: int, key_type: str, value_type: str, percpu: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.ncpu = possible_cpus() if percpu else 1

    @classmethod
    def pinned(cls, path: str, key_type: str, value_type: str, percpu: bool = False) -> "Map":
        return cls(get_pinned(path), key_type, value_type, percpu)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _key(self, key):
        if isinstance(key, ffi.CData):
            return key
        return ffi.new(self.key_type + " *", key)

    def lookup(self, key):
        """The value or None: an int for scalar types, an owning pointer for
        structs (read fields as p.field), a list per CPU for per-CPU maps."""
        n = self.ncpu
        val = ffi.new(f"{self.value_type}[{n}]" if self.percpu else f"{self.value_type} *")
        if lib.bpf_map_lookup_elem(self.fd, self._key(key), val) < 0:
            return None
        if self.percpu:  # a list even with one CPU (a one-CPU VM guest)
            return [val[i] for i in range(n)]
        return val[0] if self._scalar(self.value_type) else val

    @staticmethod
    def _scalar(ctype: str) -> bool:
        return ffi.typeof(ctype).kind == "primitive"

    def update(self, key, value, flags: int = 0) -> None:
        if not isinstance(value, ffi.CData):
            value = ffi.new(self.value_type + " *", value)
        _check(lib.bpf_map_update_elem(self.fd, self._key(key), value, flags), "map update")

    def delete(self, key) -> bool:
        return lib.bpf_map_delete_elem(self.fd, self._key(key)) == 0

    def keys(self):
        """Keys as ints (scalar key types) or owning pointers (structs)."""
        scalar = self._scalar(self.key_type)
        prev = ffi.NULL
        while True:
            nxt = ffi.new(self.key_type + " *")
            if lib.bpf_map_get_next_key(self.fd, prev, nxt) != 0:
                return
            prev = nxt
            yield nxt[0] if scalar else nxt

    def items(self):
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v


def prog_info(fd: int) -> dict:
    """Name, id and statistics of a program, by its fd. run_cnt and
    run_time_ns count only while BPF stats are on."""
    info = ffi.new("struct bpf_prog_info *")
    n = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, n), "get program info")
    return {"id": info.id, "name": ffi.string(info.name).decode(errors="replace"),
            "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns}


def prog_map_fd(prog_fd: int, name: str) -> int:
    """An fd of its own (the caller closes it) for the map `name` that a
    loaded program uses, found by the program's map ids: for a map nobody
    pinned, whose life should end with its users (a capture's program
    array, bpf/capture.h)."""
    info = ffi.new("struct bpf_prog_info *")
    n = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(prog_fd, info, n), "get program info")
    count = info.nr_map_ids
    ids = ffi.new("uint32_t[]", max(count, 1))
    info = ffi.new("struct bpf_prog_info *", {"nr_map_ids": count,
                                              "map_ids": int(ffi.cast("uintptr_t", ids))})
    n[0] = ffi.sizeof(info[0])
    _check(lib.bpf_obj_get_info_by_fd(prog_fd, info, n), "get program info")
    for map_id in ids[0:min(count, info.nr_map_ids)]:
        fd = _check(lib.bpf_map_get_fd_by_id(map_id), f"open map {map_id}")
        minfo = ffi.new("struct bpf_map_info *")
        n[0] = ffi.sizeof(minfo[0])
        if lib.bpf_obj_get_info_by_fd(fd, minfo, n) == 0 and ffi.string(minfo.name).decode() == name:
            return fd
        os.close(fd)
    raise KeyError(f"program {prog_fd} uses no map {name}")


def link_prog_fd(link_fd: int) -> int:
    """fd of the program a link attaches (the caller closes it)."""
    info = ffi.new("struct bpf_link_info *")
    n = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(link_fd, info, n), "get link info")
    return _check(lib.bpf_prog_get_fd_by_id(info.prog_id), "open program by id")


def stats_sysctl() -> bool:
    """Is kernel.bpf_stats_enabled on? (An fd from enable_stats() counts
    too, but the sysctl does not show it.)"""
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def enable_stats() -> int:
    """Turn BPF program statistics on for as long as the returned fd stays
    open (BPF_ENABLE_STATS; the sysctl is left alone)."""
    return _check(lib.bpf_enable_stats(lib.BPF_STATS_RUN_TIME), "enable BPF stats")
