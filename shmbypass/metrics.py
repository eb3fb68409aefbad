"""Prometheus metrics of one bypass instance: `shmbypass metrics`.

`--listen ADDR:PORT` serves them over HTTP (an exporter Prometheus
scrapes); `--textfile FILE` writes them for node_exporter's textfile
collector (written to a temporary file and renamed: a reader never sees half
a file). Every value is read at collection time from what `status` reads
(the BPF maps; the rings' headers: one host's pair regions, a VM pair's
region) and from the kernel's statistics of the pinned programs: the
exporter keeps no state of its own.

Conventions: counters end in `_total`, units are in the names (`_bytes`,
`_seconds`), and every series has an `instance` label naming the shmbypass
instance (SHMBYPASS_INSTANCE). Prometheus sets its own `instance` label on
scraped series: scrape the exporter with `honor_labels: true` to keep ours
(docs/DEPLOY.md).

The socket counts follow `status`: one per socket of the bypass group, so a
connection with both ends in the group counts twice. shm-tier sockets also
get series of their own (`shmbypass_shm_connection_*`, labelled by network
namespace, local and remote address), which go when the connection does.
"""
import os
import signal
import sys
import threading

from shmbypass import bpf, paths, slots, status
from shmbypass._native import lib
from shmbypass.errors import ShmbypassError

# BPF counters (status.COUNTERS names) -> (metric name without _total, help,
# extra labels). A counter missing here is still exported, as
# shmbypass_<name>_total.
COUNTER_METRICS = {
    "established": ("shmbypass_connections_established",
                    "Sockets of the bypass group that reached ESTABLISHED (each end counts)", {}),
    "closed": ("shmbypass_connections_closed",
               "Sockets of the bypass group that were closed (each end counts)", {}),
    "paired": ("shmbypass_kernel_tier_pairs",
               "Connections whose two ends were paired for the kernel tier", {}),
    "unpaired_passive": ("shmbypass_connections_unpaired_passive",
                         "Accepted sockets whose connecting end is outside the group", {}),
    "shm": ("shmbypass_shm_tier_sockets", "Sockets that entered the shm tier", {}),
    "shm_fallback": ("shmbypass_shm_tier_fallbacks",
                     "Sockets that asked for the shm tier and did not get it", {}),
    "msg_redirect": ("shmbypass_sk_msg_sends",
                     "Sends seen by sk_msg, by verdict (redirect: kernel tier; pass: TCP)",
                     {"verdict": "redirect"}),
    "msg_pass": ("shmbypass_sk_msg_sends",
                 "Sends seen by sk_msg, by verdict (redirect: kernel tier; pass: TCP)",
                 {"verdict": "pass"}),
    "bytes_redirect": ("shmbypass_kernel_tier_sent_bytes",
                       "Bytes the kernel tier moved to a peer socket's receive queue", {}),
    "redirect_failed": ("shmbypass_kernel_tier_redirect_failures",
                        "Kernel-tier sends that went back to TCP (the peer socket was gone)", {}),
    "handshake_race": ("shmbypass_handshake_races",
                       "Connections that stayed on TCP: data was sent before both ends paired", {}),
    "table_full": ("shmbypass_conn_table_full",
                   "Connections a full BPF table could not record", {}),
    "resv_expired": ("shmbypass_slot_reservations_expired",
                     "SYN-ACK slot reservations returned to the pool by the timer", {}),
    "slot_parked": ("shmbypass_slots_parked",
                    "Slots of closed sockets held for a peer VM that may still read them", {}),
    "capture_dropped": ("shmbypass_capture_dropped_records",
                        "Kernel-tier capture records lost (ring buffer full, or a send too long)",
                        {}),
    "capture_dropped_bytes": ("shmbypass_capture_dropped_bytes",
                              "Bytes of the kernel-tier capture records that were lost", {}),
}


def slot_usage(inst: paths.Instance) -> dict[str, int]:
    """A VM pair's slots by state, read without touching the free list:
    `free` (no reference), `reserved` (held by an unclaimed SYN-ACK),
    `parked` (held for a peer VM after an unclean close), `in_use` (held by
    live sockets). The four add up to the pool's size."""
    out = {"free": 0, "in_use": 0, "reserved": 0, "parked": 0}
    if not os.path.exists(inst.pin("slot_state")):
        return out
    held = {s for s, (_gen, refs) in slots.slot_states(inst).items() if refs}
    out["free"] = slots.config(inst)["slot_count"] - len(held)
    for r in slots.reservations(inst):
        state = {lib.SBP_RESV_RESERVED: "reserved", lib.SBP_RESV_PARKED: "parked"}.get(r["state"])
        if state and r["slot"] in held:
            out[state] += 1
            held.discard(r["slot"])
    out["in_use"] = len(held)
    return out


def program_stats(inst: paths.Instance) -> dict[str, dict]:
    """Program name -> {id, run_cnt, run_time_ns} for the instance's pinned
    programs (sockops through its link)."""
    out = {}
    if not os.path.isdir(inst.pin_dir):
        return out
    for pin in sorted(os.listdir(inst.pin_dir)):
        if not (pin.startswith("prog_") or pin.startswith("link_")):
            continue
        try:
            fd = bpf.get_pinned(inst.pin(pin))
        except OSError:
            continue  # unpinned while we looked
        try:
            if pin.startswith("link_"):
                prog = bpf.link_prog_fd(fd)
                try:
                    info = bpf.prog_info(prog)
                finally:
                    os.close(prog)
            else:
                info = bpf.prog_info(fd)
        finally:
            os.close(fd)
        out[info["name"] or pin] = info
    return out


class Collector:
    """A prometheus_client collector: reads everything at each collect()."""

    def __init__(self, inst: paths.Instance, stats_fd: int = -1):
        self.inst = inst
        self.stats_fd = stats_fd  # >= 0: we hold BPF stats on

    def describe(self):
        return []  # collected afresh each time: nothing to check at register time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        inst = {"instance": self.inst.name}

        def family(cls, name, doc, labels=()):
            return cls(name, doc, labels=["instance", *labels])

        st = status.status(self.inst, with_owners=False)
        up = family(GaugeMetricFamily, "shmbypass_up",
                    "1 if the bypass is attached (sockops on the cgroup)")
        up.add_metric([inst["instance"]], 1 if st["attached"] else 0)
        yield up

        feats = family(GaugeMetricFamily, "shmbypass_feature_available",
                       "Optional features this kernel took (1) or refused (0)", ["feature"])
        for name, f in sorted(st.get("features", {}).items()):
            feats.add_metric([inst["instance"], name], 1 if f["ok"] else 0)
        yield feats

        conns = family(GaugeMetricFamily, "shmbypass_connections",
                       "Live sockets of the bypass group by tier and reason (status rows: a "
                       "connection with both ends in the group counts twice)", ["tier", "reason"])
        by = {}
        nbytes = {}
        for c in st["connections"]:
            key = (c["tier"], c["reason"] or "none")
            by[key] = by.get(key, 0) + 1
            if c["tier"] != "tcp":  # BPF counts no plain-TCP bytes
                for d in ("tx", "rx"):
                    nbytes[(c["tier"], d)] = nbytes.get((c["tier"], d), 0) + c[f"bytes_{d}"]
        for (tier, reason), n in sorted(by.items()):
            conns.add_metric([inst["instance"], tier, reason], n)
        yield conns

        cb = family(GaugeMetricFamily, "shmbypass_connection_bytes",
                    "Bytes the live bypassed sockets have sent (tx) and received (rx) so far, "
                    "by tier (they drop when a connection closes)", ["tier", "direction"])
        for tier in ("kernel", "shm"):
            for d in ("tx", "rx"):
                cb.add_metric([inst["instance"], tier, d], nbytes.get((tier, d), 0))
        yield cb
        yield from self._shm_connections(st, family)

        fams = {}
        for name, value in st["counters"].items():
            mname, doc, extra = COUNTER_METRICS.get(
                name, (f"shmbypass_{name}", f"BPF counter {name}", {}))
            if mname not in fams:
                fams[mname] = family(CounterMetricFamily, mname, doc, list(extra))
            fams[mname].add_metric([inst["instance"], *extra.values()], value)
        yield from fams.values()

        errs = family(CounterMetricFamily, "shmbypass_bpf_errors",
                      "Errors the BPF programs reported, by source line and errno", ["line", "errno"])
        for line, e in sorted(st["errors"].items(), key=lambda kv: int(kv[0])):
            errs.add_metric([inst["instance"], str(line), str(e["err"])], e["count"])
        yield errs

        if st["attached"] and self.inst.load_state().get("region"):
            # Only a VM pair has a slot pool; one host's connections bring
            # their own memory.
            sl = family(GaugeMetricFamily, "shmbypass_slots",
                        "A VM pair's ring slots by state (they add up to the pool)", ["state"])
            for state, n in slot_usage(self.inst).items():
                sl.add_metric([inst["instance"], state], n)
            yield sl

        on = self.stats_fd >= 0 or bpf.stats_sysctl()
        se = family(GaugeMetricFamily, "shmbypass_bpf_stats_enabled",
                    "1 if the kernel counts BPF program runs (kernel.bpf_stats_enabled=1 or "
                    "`metrics --bpf-stats`); the run metrics are absent while it is 0")
        se.add_metric([inst["instance"]], 1 if on else 0)
        yield se
        if on:
            runs = family(CounterMetricFamily, "shmbypass_bpf_program_runs",
                          "Runs of each pinned BPF program while BPF stats were on", ["program"])
            secs = family(CounterMetricFamily, "shmbypass_bpf_program_run_seconds",
                          "Time spent in each pinned BPF program while BPF stats were on",
                          ["program"])
            for name, p in program_stats(self.inst).items():
                runs.add_metric([inst["instance"], name], p["run_cnt"])
                secs.add_metric([inst["instance"], name], p["run_time_ns"] / 1e9)
            yield runs
            yield secs


    def _shm_connections(self, st, family):
        """One series per shm-tier socket and direction (status rows): the
        stream's bytes so far (what went over TCP before the rings
        included; 0 until its ring exists) and what its ring holds unread
        (absent until then)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        labels = ["netns", "local", "remote", "direction"]
        nb = family(CounterMetricFamily, "shmbypass_shm_connection_bytes",
                    "Bytes each live shm-tier socket has sent (tx) and received (rx)", labels)
        nq = family(GaugeMetricFamily, "shmbypass_shm_connection_queued_bytes",
                    "Bytes in each live shm-tier socket's rings not read yet: what it sent (tx) "
                    "and what was sent to it (rx), like ss's Send-Q and Recv-Q", labels)
        nf = family(CounterMetricFamily, "shmbypass_shm_connection_ring_full",
                    "Times each live shm-tier socket found the ring it writes full (it then "
                    "waits, or a non-blocking send gets EAGAIN)", labels[:-1])
        nd = family(CounterMetricFamily, "shmbypass_shm_connection_doorbells",
                    "Doorbells each live shm-tier socket sent (a TCP byte that wakes a peer "
                    "asleep in poll/epoll or in another VM)", labels[:-1])
        for c in st["connections"]:
            if c["tier"] != "shm":
                continue
            for d in ("tx", "rx"):
                key = [self.inst.name, str(c["netns"]), c["local"], c["remote"], d]
                nb.add_metric(key, c[f"bytes_{d}"])
                if c.get(f"{d}_queued") is not None:
                    nq.add_metric(key, c[f"{d}_queued"])
            key = [self.inst.name, str(c["netns"]), c["local"], c["remote"]]
            nf.add_metric(key, c.get("ring_full", 0))
            nd.add_metric(key, c.get("doorbells", 0))
        yield nb
        yield nq
        yield nf
        yield nd


def registry(inst: paths.Instance, stats_fd: int = -1):
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(inst, stats_fd))
    return reg


def parse_listen(spec: str) -> tuple[str, int]:
    """ADDR:PORT, [V6ADDR]:PORT or :PORT (all addresses)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShmbypassError(f"--listen {spec!r}: expected ADDR:PORT, e.g. 127.0.0.1:9472")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def write_textfile(inst: paths.Instance, path: str, stats_fd: int = -1) -> None:
    """One atomic write for node_exporter's textfile collector."""
    from prometheus_client import write_to_textfile
    write_to_textfile(path, registry(inst, stats_fd))


def serve(inst: paths.Instance, host: str, port: int, stats_fd: int = -1,
          ready=None, stop: threading.Event | None = None) -> None:
    """Serve /metrics until SIGTERM/SIGINT (or `stop` is set)."""
    from prometheus_client import start_http_server
    server, thread = start_http_server(port, addr=host, registry=registry(inst, stats_fd))
    stop = stop or threading.Event()
    try:
        if ready:
            ready(server.server_address)
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def cmd_metrics(args) -> int:
    inst = paths.Instance.current()
    host, port = parse_listen(args.listen) if args.listen else (None, None)
    stats_fd = -1
    if args.bpf_stats:
        # Held for the exporter's life: the kernel counts runs while any
        # such fd is open, and stops when the last one closes.
        stats_fd = bpf.enable_stats()
    elif not bpf.stats_sysctl():
        print("shmbypass metrics: BPF program run counts are off (kernel.bpf_stats_enabled=0); "
              "shmbypass_bpf_program_runs_total is left out. `--bpf-stats` counts them while "
              "this exporter runs (it costs two clock reads per program run)", file=sys.stderr)
    try:
        if args.textfile:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            while True:
                write_textfile(inst, args.textfile, stats_fd)
                if not args.interval or stop.wait(args.interval):
                    return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

        def ready(addr):
            print(f"shmbypass metrics: instance {inst.name} on http://{args.listen}/metrics",
                  flush=True)
        serve(inst, host, port, stats_fd, ready, stop)
        return 0
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="Prometheus metrics: an HTTP exporter or a node_exporter "
                                       "textfile")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--listen", metavar="ADDR:PORT",
                     help="serve /metrics over HTTP (e.g. 127.0.0.1:9472)")
    how.add_argument("--textfile", metavar="FILE",
                     help="write the metrics to FILE (atomically) for node_exporter's textfile "
                          "collector (name it *.prom)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="--textfile: rewrite every SECONDS until stopped (default: once)")
    p.add_argument("--bpf-stats", action="store_true",
                   help="count BPF program runs while the exporter runs (BPF_ENABLE_STATS; the "
                        "sysctl kernel.bpf_stats_enabled is left alone)")
    p.set_defaults(func=cmd_metrics)

