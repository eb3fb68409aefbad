"""What a run of `shmbypass bench` writes: the report (a dict, saved as
bench.json), the text table, the Markdown report (bench.md, and the part of
bench/RESULTS.md below its marker line) and the plot (bench.png)."""
import json
import os

from shmbypass import __version__
from shmbypass.bench import micro
from shmbypass.bench.measure import (NOISE_CORES, NOISE_FLOOR_S, NOISE_RETRIES, PLACEMENTS,
                                     STEAL_FRACTION, TESTS, TRANSPORT_LABELS, TRANSPORTS, machine_info)
from shmbypass.bench.targets import targets


def build(runner, started, duration):
    """The report of a run: every figure, the machine, the method and the
    exact commands."""
    results = [c.to_json(micro.base(runner, c.placement, c.test)) for c in runner.cells]
    return {
        "tool": "shmbypass bench", "version": __version__, "started": started,
        "duration_s": round(duration, 1), "quick": bool(runner.args.quick),
        "poll": bool(runner.args.poll), "instance": runner.instance,
        "machine": machine_info(), "config": runner.cfg,
        "method": {
            "repetitions": runner.cfg["reps"], "noise_cores": NOISE_CORES,
            "noise_floor_s": NOISE_FLOOR_S, "steal_fraction": STEAL_FRACTION,
            "noise_retries": NOISE_RETRIES,
            "ratio": "against loopback TCP in the same placement; >1 means better than TCP "
                     "(TCP latency / latency, or throughput / TCP throughput)",
        },
        "commands": runner.commands, "results": results, "skipped": runner.skipped,
        "warnings": runner.warnings, "apps": runner.apps, "sidecar": runner.sidecar,
        "targets": targets(results, runner.apps),
    }


def fmt_ns(ns):
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.1f} us" if ns < 1e5 else f"{ns / 1e3:.0f} us"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def table_rows(report):
    """Rows for the text table and the Markdown report."""
    rows = []
    for r in report["results"]:
        s, rt = r["summary"], r["ratio_vs_tcp"]
        note = ""
        if r["engaged"] is False:
            note = "BYPASS NOT ENGAGED (tier: " + (",".join(r["tiers_seen"]) or "none") + ")"
        elif r["error"] and not s:
            note = "FAILED: " + r["error"]
        elif r["still_noisy"]:
            note = f"noisy ({r['still_noisy']} rep)"
        if r["kind"] == "rtt" and s:
            fig = f"p50 {fmt_ns(s['p50_ns'])}  p99 {fmt_ns(s['p99_ns'])}  p999 {fmt_ns(s['p999_ns'])}"
            spread = f"{fmt_ns(s['p50_ns_min'])}-{fmt_ns(s['p50_ns_max'])}"
            cpu = f"{s['cpu_us_per_op']:.1f} us/op"
            vs = "" if note.startswith("BYPASS") else (
                f"{fmt_ratio(rt.get('p50'))} (p99 {fmt_ratio(rt.get('p99'))})" if rt else "")
        elif r["kind"] == "stream" and s:
            fig = f"{s['gbps']:.2f} GB/s"
            spread = f"{s['gbps_min']:.2f}-{s['gbps_max']:.2f}"
            cpu = f"{s['cpu_s_per_gb']:.2f} s/GB"
            vs = "" if note.startswith("BYPASS") else fmt_ratio(rt.get("gbps")) if rt else ""
        elif r["kind"] == "connrate" and s:
            fig = f"{s['conns_per_s']:.0f} conn/s  p50 {fmt_ns(s['p50_ns'])}"
            spread = f"{s['conns_per_s_min']:.0f}-{s['conns_per_s_max']:.0f}"
            cpu = f"{s['client_cpu_us_per_conn']:.1f} us/conn (client)"
            vs = "" if note.startswith("BYPASS") else fmt_ratio(rt.get("conns_per_s")) if rt else ""
        else:
            fig = spread = cpu = vs = "-"
        if r["transport"] == "tcp" and s:
            vs = "1.00x (base)"
        rows.append([r["placement"], TRANSPORT_LABELS[r["transport"]], _test_label(r["test"]),
                     fig, spread, cpu, vs or "-", note])
    return rows


def sorted_rows(report):
    """table_rows() by placement, then test, then transport."""
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    return sorted(table_rows(report), key=lambda r: (order.get(r[0], 9), [t.label for t in TESTS].index(r[2]),
                                                     list(TRANSPORT_LABELS.values()).index(r[1])))


HEADER = ["placement", "transport", "test", "median", "spread (min-max)", "CPU", "vs TCP", "note"]


def _test_label(name):
    return next(t.label for t in TESTS if t.name == name)


def render_text(report):
    rows = sorted_rows(report)
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows)]
    lines = []
    prev = None
    for row in [HEADER] + rows:
        if prev is not None and row[0] != prev and row is not rows[0] and prev != "placement":
            lines.append("")
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        prev = row[0]
    out = [f"shmbypass bench ({'quick' if report['quick'] else 'full'}): "
           f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores, "
           f"kernel {report['machine']['kernel']}; medians of {report['config']['reps']} repetitions; "
           f"'vs TCP' = how many times better than loopback TCP in the same placement", ""]
    out += lines
    for s in report["skipped"]:
        out.append(f"skipped {TRANSPORT_LABELS.get(s['transport'], s['transport'])}: {s['reason']}")
    out += _apps_text(report)
    mets = [t for t in report["targets"] if t["met"] is not None]
    if mets:
        out.append("")
        out.append("targets:" + ("  (a quick run: 0.1 s windows on a shared machine move ratios "
                                 "near their line; the full run in bench/RESULTS.md is the "
                                 "reference)" if report["quick"] else ""))
        for t in mets:
            out.append(f"  {'met    ' if t['met'] else 'NOT MET'} {t['target']} ({t['placement']}): "
                       f"{t.get('got_text') or format(t['got'], '.2f')}")
    for w in report["warnings"]:
        out.append("WARNING: " + w)
    return "\n".join(out)


def _apps_text(report):
    out = []
    for title, items in (("applications", report["apps"]), ("sidecar (client -> haproxy -> server)",
                                                              report["sidecar"])):
        if not items:
            continue
        out.append("")
        out.append(title + ":")
        for a in sort_entries(items):
            out.append("  " + app_line(a))
    return out


def app_line(a):
    if a.get("skipped"):
        return f"{a['name']}: skipped: {a['skipped']}"
    parts = [f"{a['name']} [{TRANSPORT_LABELS.get(a['transport'], a['transport'])}]"]
    for k, v in a.get("figures", {}).items():
        parts.append(f"{FIGURE_LABELS.get(k, k)} {fmt_fig(v)}")
    if a.get("engaged") is False:
        parts.append("BYPASS NOT ENGAGED (tier: " + (",".join(a.get("tiers_seen") or []) or "none") + ")")
    elif a.get("ratio") is not None:
        parts.append(f"vs TCP {a['ratio']:.2f}x")
    if a.get("noisy"):
        parts.append(f"noisy: {a['noisy']}")
    elif a.get("noisy_reps"):
        parts.append(f"noisy ({a['noisy_reps']} rep)")
    if a.get("error"):
        parts.append("FAILED: " + a["error"])
    return "  ".join(parts)


FIGURE_LABELS = {
    "rps": "requests/s", "rps_1conn": "requests/s (1 conn)", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
    "p50_us": "p50 us", "p99_us": "p99 us", "p99_us_worst": "worst p99 us", "gbit_s": "Gbit/s",
    "cpu_us_per_req_ends": "CPU us/req (client+server)", "other_cpu_cores": "others' CPU (cores)",
}


def fmt_fig(v):
    if not isinstance(v, float):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def sort_entries(items):
    """Each benchmark's transports side by side, in first-seen order."""
    first = {}
    for i, a in enumerate(items):
        first.setdefault(a["name"], i)
    order = {t: i for i, t in enumerate(TRANSPORTS)}
    return sorted(items, key=lambda a: (first[a["name"]], order.get(a.get("transport"), -1)))


def app_table(items):
    """Markdown table of app or sidecar entries, one row per (name, transport)."""
    lines = ["| benchmark | transport | figures | vs TCP | note |", "|---|---|---|---|---|"]
    for a in sort_entries(items):
        if a.get("skipped"):
            lines.append(f"| {a['name']} | - | - | - | skipped: {a['skipped']} |")
            continue
        figs = ", ".join(f"{FIGURE_LABELS.get(k, k)} {fmt_fig(v)}" for k, v in a.get("figures", {}).items())
        if a.get("engaged") is False:
            vs = "-"
            note = "**BYPASS NOT ENGAGED** (tier: " + (",".join(a.get("tiers_seen") or []) or "none") + ")"
        else:
            vs = "1.00x (base)" if a["transport"] == "tcp" and not a.get("error") else (
                f"{a['ratio']:.2f}x" if a.get("ratio") is not None else "-")
            note = ""
        if a.get("noisy"):
            note += f" noisy: {a['noisy']}"
        elif a.get("noisy_reps"):
            note += f" noisy ({a['noisy_reps']} rep)"
        if a.get("error"):
            note += " FAILED: " + a["error"]
        lines.append(f"| {a['name']} | {TRANSPORT_LABELS.get(a['transport'], a['transport'])} | {figs} | "
                     f"{vs} | {note.strip()} |".replace("\n", " "))
    return lines


def render_markdown(report, plot_name):
    m = report["machine"]
    lines = [
        "# shmbypass bench",
        "",
        f"{'Quick' if report['quick'] else 'Full'} run of {report['started']} "
        f"({report['duration_s']} s): {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, "
        f"load average at start {' '.join(m.get('loadavg', []))}.",
        "",
        f"Medians of {report['config']['reps']} repetitions (spread = min-max of the per-repetition "
        f"figure). \"vs TCP\" = how many times better than loopback TCP in the same placement "
        f"(TCP latency / latency; throughput / TCP throughput). CPU = client + server CPU time per "
        f"operation (per GB for streams). Placements: same-core = both processes on CPU 0; "
        f"cross-core = server on CPU 0, client on CPU 1; unpinned = the scheduler decides.",
        "",
    ]
    if plot_name:
        lines += [f"![latency and throughput]({plot_name})", ""]
    rows = sorted_rows(report)
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for row in rows:
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    lines.append("")
    if report["targets"]:
        lines += ["## Targets", "", "| target | placement | measured | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            got = "-" if t["got"] is None else (t.get("got_text") or f"{t['got']:.2f}x")
            met = "not engaged" if t["engaged"] is False else "-" if t["met"] is None else (
                "yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['placement']} | {got} | {met} |")
        lines.append("")
    if report["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- {TRANSPORT_LABELS.get(s['transport'], s['transport'])}: {s['reason']}"
                  for s in report["skipped"]]
        lines.append("")
    for title, items in (("Applications", report["apps"]),
                         ("Sidecar: client -> haproxy (TCP mode) -> server", report["sidecar"])):
        if items:
            lines += [f"## {title}", ""] + app_table(items) + [""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in report["warnings"]] + [""]
    noisy = sum(r["noisy_repeats"] for r in report["results"])
    still = sum(r["still_noisy"] for r in report["results"])
    lines += ["## Method", "",
              f"- Repetitions run again because other processes used the CPU: {noisy}; "
              f"kept although still noisy after {NOISE_RETRIES} retries: {still}.",
              "- Each repetition has its own warm-up; RTT repetitions size their iteration count from "
              "the warm-up's pace; streams from the warm-up's rate.",
              f"- Bypass instance: `{report['instance']}` (its own, brought up and taken down by the bench).",
              "", "## Commands", ""]
    for c in report["commands"]:
        lines.append(f"- {c['what']}: `{' '.join(c['argv'])}`")
    lines.append("")
    return "\n".join(lines)


def render_plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    placements = [p for p in PLACEMENTS if any(r["placement"] == p for r in report["results"])]
    if not placements:
        return False
    fig, axes = plt.subplots(2, len(placements), figsize=(5 * len(placements), 8), squeeze=False)
    colors = {"tcp": "#d62728", "unix": "#9467bd", "kernel": "#1f77b4", "shm": "#2ca02c",
              "ring": "#7f7f7f"}
    rtt_tests = [t for t in TESTS if t.kind == "rtt"]
    stream_tests = [t for t in TESTS if t.kind == "stream"]
    for col, pl in enumerate(placements):
        ax = axes[0][col]
        for tr in TRANSPORTS:
            xs, ys, lo, hi, p99 = [], [], [], [], []
            for i, t in enumerate(rtt_tests):
                r = _find(report, tr, pl, t.name)
                if not r or not r["summary"] or r["engaged"] is False:
                    continue
                s = r["summary"]
                xs.append(i)
                ys.append(s["p50_ns"] / 1e3)
                lo.append((s["p50_ns"] - s["p50_ns_min"]) / 1e3)
                hi.append((s["p50_ns_max"] - s["p50_ns"]) / 1e3)
                p99.append(s["p99_ns"] / 1e3)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[tr],
                            label=f"{TRANSPORT_LABELS[tr]} p50")
                ax.plot(xs, p99, linestyle=":", marker=".", color=colors[tr], alpha=0.6)
        ax.set_xticks(range(len(rtt_tests)), [fmt_size(t.size) for t in rtt_tests])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"RTT, {pl} (p50 solid, p99 dotted)")
        ax.set_ylabel("round trip, us")
        ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            ax.legend(fontsize=8)
        ax = axes[1][col]
        present = [tr for tr in TRANSPORTS if any(
            _find(report, tr, pl, t.name) for t in stream_tests)]
        width = 0.8 / max(len(present), 1)
        for j, tr in enumerate(present):
            xs, ys, err = [], [], [[], []]
            for i, t in enumerate(stream_tests):
                r = _find(report, tr, pl, t.name)
                if not r or not r["summary"] or r["engaged"] is False:
                    continue
                s = r["summary"]
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                ys.append(s["gbps"])
                err[0].append(s["gbps"] - s["gbps_min"])
                err[1].append(s["gbps_max"] - s["gbps"])
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=3, color=colors[tr], label=TRANSPORT_LABELS[tr])
        ax.set_xticks(range(len(stream_tests)), [f"{fmt_size(t.size)} sends" for t in stream_tests])
        ax.set_title(f"throughput, {pl}")
        ax.set_ylabel("GB/s")
        ax.grid(True, axis="y", alpha=0.3)
        if col == 0 and present:
            ax.legend(fontsize=8)
    fig.suptitle(f"shmbypass bench: {report['machine']['cpu_model']}, {report['machine']['cores']} cores, "
                 f"kernel {report['machine']['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _find(report, transport, placement, test):
    for r in report["results"]:
        if r["transport"] == transport and r["placement"] == placement and r["test"] == test:
            return r
    return None


def write_outputs(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    plot = os.path.join(out_dir, "bench.png")
    try:
        if render_plot(report, plot):
            files["plot"] = plot
    except ImportError as e:
        report["warnings"].append(f"no plot: matplotlib is not installed ({e})")
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    files["json"] = path
    path = os.path.join(out_dir, "bench.md")
    with open(path, "w") as f:
        f.write(render_markdown(report, "bench.png" if "plot" in files else None))
    files["markdown"] = path
    return files


RESULTS_MARKER = "<!-- everything below is generated by shmbypass bench --results-md -->"


def update_results_md(path, report, files):
    """Keep FILE up to the marker line, replace the rest with the report,
    its plot linked relative to FILE."""
    head = ""
    if os.path.exists(path):
        with open(path) as f:
            head = f.read().split(RESULTS_MARKER)[0]
    plot = os.path.relpath(files["plot"], os.path.dirname(os.path.abspath(path))) if "plot" in files else None
    body = render_markdown(report, plot).replace("# shmbypass bench\n", "## The latest run\n", 1)
    with open(path, "w") as f:
        f.write(head.rstrip("\n") + "\n\n" + RESULTS_MARKER + "\n\n" + body)
    return path
