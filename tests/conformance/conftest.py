"""The conformance suite's fixtures and its table (printed at the end of
any pytest run that ran a conformance scenario: `make conformance`, `make test`)."""
import os
import subprocess

import pytest

from conformance import harness

BUILD = os.path.join(harness.ROOT, "build", "conformance")


@pytest.fixture(scope="session")
def conformance_bin():
    """The C scenario programs (tests/conformance/Makefile), built once."""
    r = subprocess.run(["make", "-s", "-C", harness.HERE, f"OUT={BUILD}"],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"building the C scenario programs failed:\n{r.stdout}{r.stderr}")
    return BUILD


_cells: dict[tuple[str, str], tuple[str, str]] = {}     # (scenario, tier) -> (cell, detail)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    info = getattr(item, "conformance", None)
    if info is None or rep.when != "call":
        return
    name, tier = item.callspec.params["name"], item.callspec.params["tier"]
    _cells[(name, tier)] = _cell(name, tier, rep, info)


def _cell(name, tier, rep, info) -> tuple[str, str]:
    from conformance.exceptions import KNOWN
    if "broken" in info:
        return "TCP-BROKEN", info["broken"]
    diffs = "; ".join(info.get("diffs") or [])
    known = KNOWN.get((name, tier))
    if hasattr(rep, "wasxfail"):
        return f"xfail {known.case}", diffs or str(rep.longrepr)[-200:]
    if rep.failed and "XPASS(strict)" in str(rep.longrepr):
        return f"XPASS {known.case}", "same as TCP now: remove the xfail"
    if rep.passed:
        if tier == "tcp":
            return "oracle", ""
        return ("known-limit", diffs) if known else ("same", "")
    if diffs:
        return "DIFFERS", diffs
    return "error", str(rep.longrepr).strip().splitlines()[-1][:200]


def pytest_terminal_summary(terminalreporter):
    if not _cells:
        return
    tr = terminalreporter
    tr.write_sep("=", "conformance: each tier against loopback TCP (docs/CONFORMANCE.md)")
    names = sorted({n for n, _ in _cells})
    width = max(len(n) for n in names) + 2
    tr.write_line(f"{'scenario':<{width}}" + "".join(f"{t:<16}" for t in harness.TIERS))
    for n in names:
        tr.write_line(f"{n:<{width}}" + "".join(f"{_cells.get((n, t), ('-',))[0]:<16}"
                                                 for t in harness.TIERS))
    details = [(n, t, d) for (n, t), (c, d) in sorted(_cells.items()) if d]
    if details:
        tr.write_line("")
        for n, t, d in details:
            tr.write_line(f"{n} under {t}: {_cells[(n, t)][0]}: {d}")
