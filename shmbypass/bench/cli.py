"""`shmbypass bench`: measure the matrix (micro.py), the apps (apps.py) and the
sidecar (sidecar.py) in one run with its own bypass instance, then write the
table, bench.json, bench.md and bench.png (report.py)."""
import argparse
import datetime
import json
import os
import signal
import sys
import time

from shmbypass.bench import apps, micro, report, sidecar
from shmbypass.bench.measure import BYPASS_TIERS, TRANSPORT_LABELS
from shmbypass.bench.runner import Runner
from shmbypass.bench.targets import targets


def measure(runner):
    """Everything the arguments ask for; the report."""
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    the_plan = [p for p in micro.plan(runner) if runner.available(p[0])]
    args = runner.args
    steps = micro.steps(runner, the_plan)
    if args.apps:
        steps += apps.steps(runner)
    if args.apps or args.sidecar:
        steps += sidecar.steps(runner)
    runner.progress.total = max(1, steps)
    micro.run(runner, the_plan)
    if args.apps:
        apps.run_apps(runner)
    if args.apps or args.sidecar:
        sidecar.run_sidecar(runner)
    runner.progress.close()
    return report.build(runner, started, time.monotonic() - t0)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="loopback TCP vs the bypass: RTT, throughput, connection rate, apps",
        description="Run the loopback-vs-bypass benchmark matrix and write a table, JSON, "
                    "a Markdown report and a PNG plot.")
    p.add_argument("--quick", action="store_true", help="short repetitions (under a minute)")
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    p.add_argument("--apps", action="store_true",
                   help="also installed real apps: redis-benchmark, wrk vs nginx, iperf3, and the sidecar")
    p.add_argument("--sidecar", action="store_true",
                   help="the sidecar scenario: client -> haproxy -> server, on loopback and across netns")
    p.add_argument("--poll", action="store_true",
                   help="the ping-pong programs busy-poll recv (MSG_DONTWAIT) 50 us before blocking")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3 quick, 5 full)")
    p.add_argument("--seconds", type=float, help="seconds per repetition (default 0.1 quick, 1 full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--results-md", metavar="FILE",
                   help="also replace what follows the marker line in FILE with the report "
                        "(bench/RESULTS.md: the hand-written reading above the marker stays)")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not measure: render the table, report and plot again from a saved bench.json")
    p.add_argument("--only", help=argparse.SUPPRESS)  # tests: comma list of transports/placements/tests
    p.set_defaults(func=cmd_bench)


_MAIN_PID = None


def cmd_bench(args) -> int:
    global _MAIN_PID
    if args.from_json:
        with open(args.from_json) as f:
            rep = json.load(f)
        rep["targets"] = targets(rep["results"], rep.get("apps", []))
        _write(rep, args)
        return 0
    runner = Runner(args)
    _MAIN_PID = runner.pid
    # Our own handlers, also for SIGINT: a shell that starts us in the
    # background sets SIGINT to ignored, and the clean-up must still run.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in handled}
    try:
        rep = measure(runner)
    except KeyboardInterrupt:
        if os.getpid() != runner.pid:
            os._exit(130)  # a forked helper: never run our clean-up twice
        runner.progress.close()
        sys.stderr.write("bench: interrupted; stopping children and taking the bypass down\n")
        runner.teardown()
        return 130
    finally:
        runner.teardown()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _write(rep, args, blank=True)
    return _verdict(rep)


def _write(rep, args, blank=False):
    """The files, then the table and the list of what was written."""
    files = report.write_outputs(rep, args.out)
    if args.results_md:
        files["results"] = report.update_results_md(args.results_md, rep, files)
    print(report.render_text(rep))
    if blank:
        print()
    print("wrote " + ", ".join(files[k] for k in ("json", "markdown", "plot", "results") if k in files))


def _verdict(report) -> int:
    """Exit status: never 0 when a bypass tier that was asked for did not run.
    The reason is the last line (stderr), after what was measured."""
    why = [f"the {TRANSPORT_LABELS[s['transport']]} could not be set up: {s['reason']}"
           for s in report["skipped"] if s["transport"] in BYPASS_TIERS]
    code = 2 if why else 0
    bad = [r for r in report["results"] if r["engaged"] is False]
    bad += [dict(a, test=a["name"]) for a in report.get("apps", []) + report.get("sidecar", [])
            if a.get("transport") in BYPASS_TIERS and a.get("engaged") is False]
    if bad:
        why.append(f"{len(bad)} measurement(s) ran outside the tier they were meant for "
                   f"(e.g. {TRANSPORT_LABELS[bad[0]['transport']]} {bad[0]['test']})")
        code = code or 3
    if why:
        sys.stdout.flush()
        sys.stderr.write("bench: FAILED: " + "; ".join(why) + "\n")
    return code


def _raise_interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)  # a forked helper being stopped
    raise KeyboardInterrupt
