"""Who may use the bypass, and which connections it leaves alone.

Two kinds of rules, both enforced in BPF from what the kernel reports:
- identity (shm tier): a connection pairs in the shm tier only if both
  programs that asked for it run as root, as an allowed user, or in an
  allowed group (`up --allow-user alice --allow-group web`, or
  `--allow-any-user`); else it takes TCP with reason policy.
- connection (both tiers): by the server's port and address
  (`--exclude-port 22`, `--include-port 6379`, `--exclude-net 10.0.0.0/8`,
  `--include-net ...`): an excluded connection stays on TCP with reason
  policy. Any include rule of a kind means "only these".
And one limit, enforced by the interposer in each process: the ring memory
its connections may hold (`--memory-max 2G`); past it, new connections stay
on TCP with reason memory-cap.
"""
import grp
import ipaddress
import os
import pwd
from dataclasses import asdict, dataclass, field

from shmbypass import bpf, paths
from shmbypass._native import ffi, lib
from shmbypass.errors import ShmbypassError

MAPS = ("policy", "allowed", "policy_ports", "policy_nets")


@dataclass
class Policy:
    any_user: bool = False
    users: list[int] = field(default_factory=list)     # uids
    groups: list[int] = field(default_factory=list)    # gids
    exclude_ports: list[int] = field(default_factory=list)
    include_ports: list[int] = field(default_factory=list)
    exclude_nets: list[str] = field(default_factory=list)
    include_nets: list[str] = field(default_factory=list)
    memory_max: int = 0     # bytes of ring memory per process (0: no cap)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Policy":
        return cls(**(d or {}))


def uid_of(name: str) -> int:
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ShmbypassError(f"--allow-user: no such user: {name}") from None


def gid_of(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ShmbypassError(f"--allow-group: no such group: {name}") from None


def port_of(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ShmbypassError(f"not a TCP port: {text}")
    return int(text)


def size_of(text: str) -> int:
    """A byte count: 512K, 64M, 2G (powers of 1024) or plain bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t[-1:] in units and t[-1:] else (t, "")
    if not num.isdigit() or int(num) <= 0:
        raise ShmbypassError(f"--memory-max: not a size: {text} (e.g. 512M, 2G)")
    return int(num) * units[unit]


def net_of(text: str) -> ipaddress.IPv6Network:
    """A network as the BPF trie holds it: IPv6, IPv4 as ::ffff:a.b.c.d/96+n."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ShmbypassError(f"not an address or network: {text}") from None
    if net.version == 4:
        mapped = ipaddress.IPv6Address("::ffff:" + str(net.network_address))
        return ipaddress.IPv6Network(f"{mapped}/{96 + net.prefixlen}")
    return net


def checked_net(text: str) -> str:
    net_of(text)
    return text


def apply(inst: paths.Instance, p: Policy) -> None:
    """Write the policy into the instance's maps (pinned by `up`), and the
    memory cap where every interposer reads it (/run/<instance>/memory-max)."""
    cap = os.path.join(inst.run_dir, "memory-max")
    with open(cap + ".tmp", "w") as f:
        f.write(f"{p.memory_max}\n")
    os.chmod(cap + ".tmp", 0o644)
    os.replace(cap + ".tmp", cap)
    flags = ((lib.SBP_POLICY_ANY_USER if p.any_user else 0) |
             (lib.SBP_POLICY_PORTS_ONLY if p.include_ports else 0) |
             (lib.SBP_POLICY_NETS_ONLY if p.include_nets else 0))
    with bpf.Map.pinned(inst.pin("policy"), "uint32_t", "struct sbp_policy") as m:
        m.update(0, {"flags": flags})
    with bpf.Map.pinned(inst.pin("allowed"), "struct sbp_allow_key", "uint32_t") as m:
        for k in list(m.keys()):
            m.delete(k)
        for uid in p.users:
            m.update({"kind": lib.SBP_ALLOW_UID, "id": uid}, 1)
        for gid in p.groups:
            m.update({"kind": lib.SBP_ALLOW_GID, "id": gid}, 1)
    with bpf.Map.pinned(inst.pin("policy_ports"), "uint16_t", "uint8_t") as m:
        for k in list(m.keys()):
            m.delete(k)
        for port in p.exclude_ports:
            m.update(port, lib.SBP_POLICY_EXCLUDE)
        for port in p.include_ports:
            m.update(port, lib.SBP_POLICY_INCLUDE)
    with bpf.Map.pinned(inst.pin("policy_nets"), "struct sbp_net_key", "uint8_t") as m:
        for k in list(m.keys()):
            m.delete(k)
        for text, action in [(n, lib.SBP_POLICY_EXCLUDE) for n in p.exclude_nets] + \
                            [(n, lib.SBP_POLICY_INCLUDE) for n in p.include_nets]:
            net = net_of(text)
            key = ffi.new("struct sbp_net_key *")
            key.prefixlen = net.prefixlen
            raw = net.network_address.packed
            for i in range(4):
                key.ip[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
            m.update(key, action)


def describe(p: Policy) -> list[str]:
    """One line per rule, for `up` and `status`."""
    who = "any user" if p.any_user else ", ".join(
        ["root"] + [f"uid {u}" for u in p.users] + [f"gid {g}" for g in p.groups])
    out = [f"shm tier allowed for: {who}"]
    for what, items in (("excluded ports", p.exclude_ports), ("only ports", p.include_ports),
                        ("excluded networks", p.exclude_nets), ("only networks", p.include_nets)):
        if items:
            out.append(f"{what}: {', '.join(str(i) for i in items)}")
    if p.memory_max:
        out.append(f"ring memory per process: at most {p.memory_max} bytes")
    return out
