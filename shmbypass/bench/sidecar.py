"""The sidecar scenario of `shmbypass bench --sidecar` (and --apps):
client -> haproxy (TCP mode) -> server, first on loopback, then with client,
proxy and server each in its own network namespace joined by veth pairs,
like three pods; 64 B and 1 KiB RTT p50/p99 and requests per second, one
connection and 8 in parallel, over TCP and each bypass tier."""
import os
import shutil

from shmbypass.bench.apps import add_ratios, app_transports, free_port, judge, wait_listen
from shmbypass.bench.measure import BYPASS_TIERS, TRANSPORT_LABELS, median, pingpong_argv
from shmbypass.bench.runner import BenchError, Child, NotAvailable


HAPROXY_CFG = """global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 2m
    timeout server 2m
frontend fe
    bind {faddr}:{fport}
    default_backend be
backend be
    server s1 {saddr}:{sport}
"""

PARALLEL = 8


class Pods:
    """Three network namespaces (client, proxy, server) joined by two veth
    pairs, made with pyroute2. Addresses exist only inside them."""

    NET = ("10.211.1.", "10.211.2.")

    def __init__(self, runner):
        from pyroute2 import IPRoute, NetNS, netns
        tag = f"sbb{os.getpid() % 10000000}"
        self.names = {role: f"{tag}-{role}" for role in ("client", "proxy", "server")}
        for n in self.names.values():
            runner.netns.append(n)  # registered first: removed even if set-up fails half way
            netns.create(n)
        links = [("client", "proxy", self.NET[0], f"{tag}a"), ("proxy", "server", self.NET[1], f"{tag}b")]
        with IPRoute() as ipr:
            for left, right, _, ifn in links:
                ipr.link("add", ifname=ifn + "0", kind="veth",
                         peer={"ifname": ifn + "1", "net_ns_fd": self.names[right]})
                ipr.link("set", index=ipr.link_lookup(ifname=ifn + "0")[0], net_ns_fd=self.names[left])
        for left, right, net, ifn in links:
            for role, ifname, host in ((left, ifn + "0", "1"), (right, ifn + "1", "2")):
                with NetNS(self.names[role]) as ns:
                    idx = ns.link_lookup(ifname=ifname)[0]
                    ns.addr("add", index=idx, address=net + host, prefixlen=24)
                    ns.link("set", index=idx, state="up")
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        self.proxy_front = self.NET[0] + "2"
        self.server_addr = self.NET[1] + "2"

    def enter(self, role):
        name = self.names[role]

        def preexec():
            from pyroute2 import netns
            netns.setns(name, flags=0)
        return preexec


def steps(runner):
    """Progress-bar steps: one per topology and transport."""
    return len(app_transports(runner)) * 2


def run_sidecar(runner):
    if not runner.selected("sidecar", None, None):
        return
    haproxy = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not haproxy:
        runner.progress.say("bench: sidecar: haproxy not installed, skipped")
        runner.sidecar.append({"name": "sidecar", "skipped": "haproxy not installed"})
        return
    entries = []
    for topology in ("loopback", "netns"):
        pods = None
        if topology == "netns":
            try:
                pods = Pods(runner)
            except Exception as e:  # noqa: BLE001 - any netns failure: say why, go on
                runner.loud(f"sidecar across network namespaces: cannot set up the namespaces: {e}")
                runner.sidecar.append({"name": "sidecar netns", "skipped": f"namespaces: {e}"})
                continue
        for transport in app_transports(runner):
            runner.progress.set(f"sidecar {topology} [{transport}]")
            try:
                entries += sidecar_once(runner, haproxy, topology, transport, pods)
            except (BenchError, NotAvailable) as e:
                runner.loud(f"sidecar {topology} under {TRANSPORT_LABELS[transport]} failed: {e}")
                entries.append({"name": f"sidecar {topology}", "transport": transport, "error": str(e),
                                "figures": {}})
            finally:
                runner.stop_children()
                runner.progress.step()
        if pods:
            runner.remove_netns()
    add_ratios(entries)
    runner.sidecar.extend(entries)


def sidecar_once(runner, haproxy, topology, transport, pods):
    def pre(role):
        return pods.enter(role) if pods else None

    seconds = runner.cfg["rtt_seconds"]
    reps = runner.cfg["reps"]
    saddr = pods.server_addr if pods else "127.0.0.1"
    sport = 5101 if pods else free_port()
    server = Child(runner, runner.wrap(transport, pingpong_argv("server", f"{saddr}:{sport}", None, False, "--threads")),
                   f"sidecar {topology} server [{transport}]", preexec=pre("server"))
    server.read_json(timeout=30)
    faddr = pods.proxy_front if pods else "127.0.0.1"
    fport = 5100 if pods else free_port()
    cfg = os.path.join(runner.tmp, f"haproxy-{topology}-{transport}.cfg")
    with open(cfg, "w") as f:
        f.write(HAPROXY_CFG.format(faddr=faddr, fport=fport, saddr=saddr, sport=sport))
    proxy = Child(runner, runner.wrap(transport, [haproxy, "-q", "-db", "-f", cfg]),
                  f"sidecar {topology} haproxy [{transport}]", preexec=pre("proxy"), stdout=False)
    wait_listen(proxy, fport)

    target = f"{faddr}:{fport}"
    client = Child(runner, runner.wrap(transport, pingpong_argv("client", target, None, False, "--stdin")),
                   f"sidecar {topology} client [{transport}]", stdin=True, preexec=pre("client"))
    out = []
    tiers = None
    for size in (64, 1024):
        samples, noisy = [], 0
        for _ in range(reps):
            for attempt in range(3):
                # The proxy reports no CPU of its own: measure the whole
                # process tree against the machine's busy time.
                win = runner.window()
                client.send(f"rtt {size} {seconds} {runner.cfg['rtt_warmup']}\n")
                r = client.read_json(60 + 20 * seconds)
                why, _ = win.noise()
                if not why or attempt == 2 or not runner.retry():
                    break
                runner.progress.say(f"bench: machine busy, repeating sidecar {topology} [{transport}] "
                                    f"RTT {size} B: {why}")
            noisy += bool(why)
            samples.append(r)
        if tiers is None and transport in BYPASS_TIERS:
            tiers = runner.tiers_for_ports([fport, sport])
        p50 = median(s["p50_ns"] for s in samples)
        p99 = median(s["p99_ns"] for s in samples)
        rps = median(s["iters"] / s["wall_s"] for s in samples)
        cpu = median((s["client_cpu_s"] + s["server_cpu_s"]) / s["iters"] * 1e6 for s in samples)
        entry = {"name": f"sidecar {topology} RTT {size} B", "transport": transport, "topology": topology,
                 "metric": "p50_us", "higher_better": False,
                 "figures": {"p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "rps_1conn": rps,
                             "cpu_us_per_req_ends": cpu}, "noisy_reps": noisy}
        out.append(entry)
    client.finish()

    # Requests per second with PARALLEL connections at once.
    win = runner.window()
    clients = [Child(runner, runner.wrap(transport, pingpong_argv(
        "client", target, None, False, "--mode", "rtt", "--size", "64", "--duration", str(max(seconds, 0.5)),
        "--warmup", "200")), f"sidecar {topology} parallel client [{transport}]", preexec=pre("client"),
        log=(i == 0)) for i in range(PARALLEL)]
    results = [c.read_json(60 + 20 * seconds) for c in clients]
    for c in clients:
        c.finish()
    rps = sum(r["iters"] / r["wall_s"] for r in results)
    why, other = win.noise()
    out.append({"name": f"sidecar {topology} {PARALLEL} connections 64 B", "transport": transport,
                "topology": topology, "metric": "rps", "higher_better": True, "noisy": why,
                "figures": {"rps": rps, "p99_us_worst": max(r["p99_ns"] for r in results) / 1e3,
                            "other_cpu_cores": other}})
    for e in out:
        judge(runner, e, transport, tiers)
    return out
