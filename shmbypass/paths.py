"""Where things live: the package's built assets and one bypass instance's
pins, cgroup and run directory.

An *instance* is one independent bypass set-up. The default is named
"shmbypass"; tests and the bench use their own names (SHMBYPASS_INSTANCE) so
they never disturb a user's set-up.

An instance name becomes a directory under bpffs, /run and the cgroup tree
(and a /dev/shm name), whose entries `down` removes as root: so it is one
plain path component, checked wherever a name is turned into an Instance.
"""
import json
import os
import re
from dataclasses import dataclass

from shmbypass.errors import ShmbypassError

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PKG_DIR)  # the checkout (the VM pair's guests mount it)
BUILD_DIR = os.path.join(ROOT, "build")
BPF_DIR = os.environ.get("SHMBYPASS_BPF_DIR", os.path.join(PKG_DIR, "_bpf"))
BIN_DIR = os.path.join(PKG_DIR, "_bin")
BPFFS = os.environ.get("SHMBYPASS_BPFFS", "/sys/fs/bpf")


def bpf_object(name: str) -> str:
    return os.path.join(BPF_DIR, f"{name}.bpf.o")


def tool(name: str) -> str:
    return os.path.join(BIN_DIR, name)


def cgroup2_root() -> str | None:
    """Mount point of the cgroup v2 hierarchy, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return fields[4]
    return None


# Letters, digits, '_', '.', '-'; 1-64 of them; no leading '.', no "..".
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_instance_name(name: str) -> str:
    """name, if it is a safe instance name; else a ShmbypassError that says why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ShmbypassError(
            f"invalid instance name {name!r} (SHMBYPASS_INSTANCE): use 1-64 letters, digits, "
            "'_', '.' or '-', not starting with '.' and without '..'")
    return name


def default_instance() -> str:
    return check_instance_name(os.environ.get("SHMBYPASS_INSTANCE", "shmbypass"))


@dataclass
class Instance:
    name: str

    def __post_init__(self):
        check_instance_name(self.name)

    @classmethod
    def current(cls) -> "Instance":
        return cls(default_instance())

    @property
    def pin_dir(self) -> str:
        return os.path.join(BPFFS, self.name)

    @property
    def run_dir(self) -> str:
        return os.path.join("/run", self.name)

    def pin(self, obj: str) -> str:
        return os.path.join(self.pin_dir, obj)

    @property
    def state_file(self) -> str:
        return os.path.join(self.run_dir, "state.json")

    def default_cgroup(self) -> str | None:
        root = cgroup2_root()
        return os.path.join(root, self.name) if root else None

    def load_state(self) -> dict:
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save_state(self, state: dict) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    @property
    def cgroup(self) -> str | None:
        return self.load_state().get("cgroup") or self.default_cgroup()
