"""The matrix of `shmbypass bench`: every transport x placement x test
(bench/README.md, "The matrix").

One server and one client process per (transport, placement); the client
keeps one connection and runs each test on command (stdin), so the figures
of one cell share a connection whose tier is checked with `shmbypass status
--json` while it is open. The raw ring (sbp-ringbench) has no sockets and
takes counts, not durations. A repetition during which other processes used
the CPU is run again, within the run's budget (Runner.retry)."""
import os
from dataclasses import dataclass, field

from shmbypass.bench.measure import (BYPASS_TIERS, CONNRATE_PLACEMENTS, NOISE_RETRIES, PLACEMENTS,
                                     TESTS, TRANSPORT_LABELS, TRANSPORTS, Test, engaged, machine_cpu,
                                     noise_of, pingpong_argv, pingpong_line, ratio, ringbench_argv,
                                     summarize)
from shmbypass.bench.runner import BenchError, Child


@dataclass
class Cell:
    transport: str
    placement: str
    test: Test
    reps: list = field(default_factory=list)
    noisy_repeats: int = 0
    still_noisy: int = 0
    engaged: bool | None = None     # None: not a bypass transport
    tiers_seen: list = field(default_factory=list)
    error: str | None = None
    pace: float | None = None       # raw ring: ns per round trip or per byte, last repetition

    def to_json(self, base):
        s = summarize(self.test, self.reps)
        return {
            "transport": self.transport, "placement": self.placement, "test": self.test.name,
            "kind": self.test.kind, "size": self.test.size, "engaged": self.engaged,
            "tiers_seen": self.tiers_seen, "error": self.error,
            "noisy_repeats": self.noisy_repeats, "still_noisy": self.still_noisy,
            "summary": s,
            "ratio_vs_tcp": ratio(self.test, s, base) if self.engaged is not False and base else {},
            "samples": self.reps,
        }


# -- the plan


def plan(runner):
    """[(transport, placement, [tests])] that --only selects and this machine can place."""
    matrix_names = set(PLACEMENTS) | {t.name for t in TESTS}
    if runner.only & {"apps", "sidecar"} and not runner.only & matrix_names:
        return []  # --only apps,sidecar[,transports]: no matrix
    out = []
    for transport in TRANSPORTS:
        if not runner.selected(transport, None, None):
            continue
        for placement in PLACEMENTS:
            if not runner.selected(transport, placement, None) or not placement_possible(runner, placement):
                continue
            tests = [t for t in TESTS if runner.selected(transport, placement, t.name)
                     and (t.kind != "connrate" or placement in CONNRATE_PLACEMENTS)
                     and not (transport == "ring" and t.kind == "connrate")]
            if tests:
                out.append((transport, placement, tests))
    return out


def placement_possible(runner, placement):
    """Whether the CPUs the placement pins to exist; says why not, once."""
    missing = sorted(c for c in PLACEMENTS[placement] if c is not None and c >= (os.cpu_count() or 1))
    if missing and placement not in runner.placements_skipped:
        runner.placements_skipped.add(placement)
        runner.skipped.append({"transport": placement,
                               "reason": f"this machine has no CPU {missing[0]} to pin to"})
        runner.progress.say(f"bench: placement {placement} skipped: no CPU {missing[0]} to pin to")
    return not missing


def steps(runner, the_plan):
    """Progress-bar steps of a plan: one per repetition."""
    return sum(len(tests) for _, _, tests in the_plan) * runner.cfg["reps"]


def run(runner, the_plan):
    """Measure every cell of the plan into runner.cells."""
    if the_plan:
        runner.note_command("the client's test lines on its stdin (one per repetition)",
                            sorted({pingpong_line(t, runner.cfg).strip()
                                    for _, _, tests in the_plan for t in tests}))
    ring = {placement: [Cell("ring", placement, t) for t in tests]
            for transport, placement, tests in the_plan if transport == "ring"}
    shm_placements = {placement for transport, placement, _ in the_plan if transport == "shm"}
    for transport, placement, tests in the_plan:
        if transport == "ring":
            if placement not in shm_placements:
                run_cell_ring(runner, placement, ring[placement])
        else:
            paired = ring.get(placement, []) if transport == "shm" else []
            run_cell_pingpong(runner, transport, placement, tests, paired)
            if paired:
                run_cell_ring(runner, placement, paired)   # what the pairing left undone
    order = {(tr, pl, t.name): i for i, (tr, pl, t) in
             enumerate((tr, pl, t) for tr in TRANSPORTS for pl in PLACEMENTS for t in TESTS)}
    runner.cells.sort(key=lambda c: order[(c.transport, c.placement, c.test.name)])


def base(runner, placement, test):
    """TCP's summary in the same placement: what ratios compare with."""
    for c in runner.cells:
        if c.transport == "tcp" and c.placement == placement and c.test == test and c.reps:
            return summarize(test, c.reps)
    return None


# -- sbp-pingpong cells


def run_cell_pingpong(runner, transport, placement, tests, paired=()):
    """paired: raw-ring cells of this placement, whose repetitions alternate
    with this cell's (bench/README.md, "Method")."""
    scpu, ccpu = PLACEMENTS[placement]
    listen = f"unix:{runner.tmp}/pp.sock" if transport == "unix" else "127.0.0.1:0"
    label = f"{transport}/{placement}"
    server = Child(runner, runner.wrap(transport, pingpong_argv("server", listen, scpu, runner.args.poll)),
                   f"{label} server")
    cells = [Cell(transport, placement, t) for t in tests]
    try:
        addr = server.read_json(timeout=30)["listening"]
        client = Child(runner, runner.wrap(transport, pingpong_argv("client", addr, ccpu, runner.args.poll,
                                                                    "--stdin")),
                       f"{label} client", stdin=True)
        port = addr.rsplit(":", 1)[-1]
        expected = BYPASS_TIERS.get(transport)
        checked = False
        # Tests that keep the connection first; connrate closes it.
        for cell in sorted(cells, key=lambda c: c.test.kind == "connrate"):
            if expected and not checked and cell.test.kind == "connrate":
                # Short connections are gone before status can see them:
                # look at one long-lived connection instead.
                engagement_probe(runner, transport, addr, cells)
                checked = True
            ring = next((r for r in paired if r.test == cell.test), None)
            run_reps(runner, client, cell, f"{label} {cell.test.name}", ring)
            if expected and not checked:
                tiers = runner.tiers_for_port(port)
                checked = True
                record_engagement(runner, transport, placement, cells, tiers)
        client.finish()
    except BenchError as e:
        for c in cells:
            if not c.reps:
                c.error = str(e)
        runner.loud(f"{label}: {e}")
    finally:
        server.stop()
    runner.cells.extend(cells)


def engagement_probe(runner, transport, addr, cells):
    """For a cell with only connection-rate tests: hold one connection open
    and look at its tier."""
    probe = Child(runner, runner.wrap(transport, pingpong_argv("client", addr, None, False, "--mode", "rtt",
                                                               "--iters", "10", "--warmup", "0", "--hold")),
                  f"{transport} engagement probe", stdin=True, log=False)
    try:
        probe.read_json(timeout=30)
        tiers = runner.tiers_for_port(addr.rsplit(":", 1)[-1])
    finally:
        probe.finish()
    record_engagement(runner, transport, cells[0].placement, cells, tiers)


def record_engagement(runner, transport, placement, cells, tiers):
    expected = BYPASS_TIERS[transport]
    ok = engaged(transport, tiers)
    for c in cells:
        c.engaged = ok
        c.tiers_seen = tiers
    if not ok:
        seen = ", ".join(tiers) if tiers else "no connection of the bypass group"
        runner.loud(f"THE BYPASS DID NOT ENGAGE for {TRANSPORT_LABELS[transport]} ({placement}): "
                    f"`shmbypass status` shows {seen} instead of tier {expected}; "
                    f"its figures are plain TCP and get no ratio")


def _keep(runner, cell, r, attempt, label):
    """Mark a repetition's noise; True when it is to be kept (quiet, or out
    of retries), False when it is to be run again."""
    why = r["noisy"]
    r["attempt"] = attempt
    if not why:
        return True
    if attempt < NOISE_RETRIES and runner.retry():
        cell.noisy_repeats += 1
        runner.progress.say(f"bench: machine busy, repeating {label}: {why}")
        return False
    cell.still_noisy += 1
    return True


def run_reps(runner, client, cell, label, ring=None):
    """The cell's repetitions; after each, one of the ring cell's."""
    test = cell.test
    timeout = 60 + 20 * runner.cfg[f"{test.kind}_seconds"]
    for rep in range(runner.cfg["reps"]):
        runner.progress.set(f"{label} rep {rep + 1}/{runner.cfg['reps']}")
        for attempt in range(NOISE_RETRIES + 1):
            client.send(pingpong_line(test, runner.cfg))
            r = client.read_json(timeout)
            r["noisy"] = noise_of(r) if test.kind != "connrate" else None
            if _keep(runner, cell, r, attempt, f"{label} rep {rep + 1}"):
                break
        cell.reps.append(r)
        runner.progress.step()
        if ring is not None and not ring.error:
            run_ring_rep(runner, ring)


# -- the raw ring


def run_cell_ring(runner, placement, cells):
    """The raw ring (no sockets): sbp-ringbench forks its two sides and
    prints one JSON line like sbp-pingpong's client. The cells' missing
    repetitions (all of them, unless they alternated with the shm tier's)."""
    for cell in cells:
        while len(cell.reps) < runner.cfg["reps"] and not cell.error:
            run_ring_rep(runner, cell)
    runner.cells.extend(cells)


def run_ring_rep(runner, cell):
    """One repetition of a raw-ring cell. It takes counts, not durations:
    each is sized from the previous one's pace."""
    scpu, ccpu = PLACEMENTS[cell.placement]  # A measures, like the client
    t, rep = cell.test, len(cell.reps)
    runner.progress.set(f"ring/{cell.placement} {t.name} rep {rep + 1}/{runner.cfg['reps']}")
    for attempt in range(NOISE_RETRIES + 1):
        argv = _ringbench_argv(runner, t, scpu, ccpu, cell.pace)
        try:
            r = run_ringbench(runner, argv, f"raw ring {t.name}", log=(rep == 0 and attempt == 0))
        except BenchError as e:
            cell.error = str(e)
            runner.loud(f"raw ring {cell.placement} {t.name}: {e}")
            return
        cell.pace = (r["wall_s"] * 1e9 / r["iters"]) if t.kind == "rtt" else (r["wall_s"] * 1e9 / r["bytes"])
        r["noisy"] = noise_of(r)
        if _keep(runner, cell, r, attempt, f"ring/{cell.placement} {t.name} rep {rep + 1}"):
            break
    cell.reps.append(r)
    runner.progress.step()


def _ringbench_argv(runner, test, scpu, ccpu, pace):
    """A repetition about --seconds long, from the previous one's pace."""
    secs = runner.cfg[f"{test.kind}_seconds"]
    if test.kind == "rtt":
        iters = int(secs * 1e9 / pace) if pace else int(secs * 1e9 / 5000)
        return ringbench_argv("rtt", test.size, iters=max(200, min(iters, 20_000_000)),
                              warmup=runner.cfg["rtt_warmup"], cpu_a=ccpu, cpu_b=scpu)
    nbytes = int(secs * 1e9 / pace) if pace else int(secs * 2e9)
    nbytes = max(4 * test.size, nbytes - nbytes % test.size)
    return ringbench_argv(test.kind, test.size, nbytes=nbytes, cpu_a=ccpu, cpu_b=scpu)


def run_ringbench(runner, argv, what, log):
    """Run it once; machine busy time is taken around the whole run and
    compared with both processes' whole CPU time (wait4 counts the
    forked side, which the measuring side reaps)."""
    m0 = machine_cpu()
    child = Child(runner, argv, what, log=log)
    try:
        r = child.read_json(timeout=60 + 20 * max(runner.cfg["rtt_seconds"], runner.cfg["stream_seconds"]))
        _, status, ru = os.wait4(child.p.pid, 0)
        child.p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        child.stop()
        runner.children.remove(child)
    m1 = machine_cpu()
    if child.p.returncode != 0:
        raise BenchError(f"{what}: exit status {child.p.returncode}")
    r["client_cpu_s"] = r.get("cpu_a_s", 0.0)
    r["server_cpu_s"] = r.get("cpu_b_s", 0.0)
    total = ru.ru_utime + ru.ru_stime
    # noise_of() compares machine busy time with our CPU over one window:
    # here the window is the whole process, so use whole-process figures.
    r["machine_busy_s"] = round(m1[0] - m0[0] - (total - r["client_cpu_s"] - r["server_cpu_s"]), 3)
    r["machine_steal_s"] = round(m1[1] - m0[1], 3)
    return r
