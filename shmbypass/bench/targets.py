"""The issues' targets for `shmbypass bench`, and how a report meets them."""
from shmbypass.bench.measure import PLACEMENTS

# Issue targets, as ratios against TCP in the same placement (>1 = better).
# The issues' targets. against "tcp": the ratio column (>1 = better than TCP,
# want at least `want`); against "ring": latency as a multiple of the raw
# ring's (want at most `want`), throughput as a fraction of it (at least).
# An app target names an entry of --apps by its name.
TARGETS = [
    dict(transport="kernel", test="rtt64", want=1.5, text="kernel tier 64 B RTT at least 1.5x lower than TCP"),
    dict(transport="kernel", test="stream1m", want=1.5, text="kernel tier 1 MiB throughput at least 1.5x TCP"),
    dict(transport="shm", test="rtt64", placement="cross-core", want=20.0,
         text="shm tier 64 B RTT on different cores at least 20x lower than TCP"),
    dict(transport="shm", test="rtt64", placement="cross-core", against="ring", want=1.2,
         text="shm tier 64 B RTT on different cores within 1.2x of the raw ring (issue 12)"),
    dict(transport="shm", test="rtt64", placement="same-core", want=2.0,
         text="shm tier 64 B RTT on one core at least 2x lower than TCP"),
    dict(transport="shm", test="stream64k", want=5.0, text="shm tier 64 KiB throughput at least 5x TCP"),
    dict(transport="shm", test="stream64k", against="ring", want=0.9,
         text="shm tier 64 KiB throughput at least 90% of the raw ring (issue 12)"),
    dict(transport="shm", test="connrate", want=0.9, text="shm tier connections per second at least 90% of TCP"),
    dict(transport="shm", app="redis-benchmark GET -c 1", want=15.0,
         text="shm tier redis-benchmark -c 1 GET at least 15x TCP (issue 12)"),
    dict(transport="shm", app="redis-benchmark GET -c 50", want=1.3,
         text="shm tier redis-benchmark -c 50 GET at least 1.3x TCP"),
]


def targets(results, apps=()):
    out = []
    by = {(r["transport"], r["placement"], r["test"]): r for r in results}
    for t in TARGETS:
        base = {"target": t["text"], "transport": t["transport"], "want": t["want"]}
        if "app" in t:
            for a in apps:
                if a.get("name") == t["app"] and a.get("transport") == t["transport"]:
                    got = a.get("ratio")
                    out.append(dict(base, placement="unpinned", test=t["app"], got=got,
                                    got_text=None if got is None else f"{got:.2f}x TCP",
                                    engaged=a.get("engaged"), met=None if got is None else got >= t["want"]))
            continue
        placements = [t["placement"]] if t.get("placement") else list(PLACEMENTS)
        for pl in placements:
            r = by.get((t["transport"], pl, t["test"]))
            if not r or not r["summary"]:
                continue
            if t.get("against") == "ring":
                ring = by.get(("ring", pl, t["test"]))
                got = None
                if ring and ring["summary"] and r["engaged"] is not False:
                    if r["kind"] == "rtt":
                        got = r["summary"]["p50_ns"] / ring["summary"]["p50_ns"]
                        text, met = f"{got:.2f}x the ring's p50", got <= t["want"]
                    else:
                        got = r["summary"]["gbps"] / ring["summary"]["gbps"]
                        text, met = f"{got * 100:.0f}% of the ring", got >= t["want"]
            else:
                rt = r["ratio_vs_tcp"]
                got = rt.get("p50") or rt.get("gbps") or rt.get("conns_per_s")
                if got is not None:
                    text, met = f"{got:.2f}x TCP", got >= t["want"]
            out.append(dict(base, placement=pl, test=t["test"], got=got, engaged=r["engaged"],
                            got_text=None if got is None else text, met=None if got is None else met))
    return out
