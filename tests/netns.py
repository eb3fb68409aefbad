"""Network namespaces joined by veth, made with pyroute2, removed afterwards.

The addresses live only inside namespaces the test creates (the project's
own test hosts); nothing is routed anywhere else."""
import os
import uuid

from pyroute2 import IPRoute, NetNS, netns


class VethPair:
    """Two namespaces, A and B, joined by one veth link: A=.1, B=.2."""

    def __init__(self, prefix="10.213.0", v6_prefix="fd00:213::"):
        tag = uuid.uuid4().hex[:6]
        self.ns = (f"sbt-{os.getpid()}-{tag}-a", f"sbt-{os.getpid()}-{tag}-b")
        self.ips = (f"{prefix}.1", f"{prefix}.2")
        self.ip6s = (f"{v6_prefix}1", f"{v6_prefix}2")
        ifs = (f"sv{tag}a", f"sv{tag}b")
        for name in self.ns:
            netns.create(name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=ifs[0], kind="veth", peer=ifs[1])
                for ifname, name in zip(ifs, self.ns):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=name)
            for ifname, name, ip, ip6 in zip(ifs, self.ns, self.ips, self.ip6s):
                with NetNS(name) as ns:
                    lo = ns.link_lookup(ifname="lo")[0]
                    ns.link("set", index=lo, state="up")
                    idx = ns.link_lookup(ifname=ifname)[0]
                    ns.addr("add", index=idx, address=ip, prefixlen=24)
                    ns.addr("add", index=idx, address=ip6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                    ns.link("set", index=idx, state="up")
        except BaseException:
            self.close()
            raise

    def close(self):
        for name in self.ns:
            try:
                netns.remove(name)  # the veth dies with its namespace
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def enter(name):
    """Move the calling process (a forked child) into namespace name."""
    netns.setns(name)
