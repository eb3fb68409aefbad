"""Differential conformance: every scenario under plain loopback TCP (the
oracle), the kernel tier and the shm tier; a bypass run passes when what
its programs saw equals TCP's and its connections took the tier it tests
(docs/CONFORMANCE.md). `make conformance` runs this alone and prints the
table."""
import os
import re

import pytest

from conformance import harness
from conformance.exceptions import KNOWN

DOC = os.path.join(harness.ROOT, "docs", "CONFORMANCE.md")


def _params():
    for name in harness.scenario_names():
        for tier in harness.TIERS:
            known = KNOWN.get((name, tier))
            marks = []
            if known and known.kind == "xfail":
                marks.append(pytest.mark.xfail(strict=True, reason=f"issue {known.case}: {known.reason}"))
            yield pytest.param(name, tier, id=f"{name}-{tier}", marks=marks)


@pytest.mark.parametrize("name,tier", list(_params()))
def test_scenario(name, tier, conformance_bin, request):
    if os.geteuid() != 0:
        pytest.fail("the conformance suite must run as root")
    cell = request.node.conformance = {}
    tcp = harness.oracle(name, conformance_bin)
    bad = harness.check_oracle(tcp)
    if bad:
        cell["broken"] = "; ".join(bad)
        pytest.fail(f"the scenario itself is wrong under TCP: {bad}\n{tcp.describe()}")
    if tier == "tcp":
        return
    got = harness.run(name, tier, conformance_bin)
    diffs = harness.compare(tcp, got)
    cell["diffs"] = diffs
    known = KNOWN.get((name, tier))
    if known and known.kind == "limit":
        assert diffs, (f"{name} under {tier} no longer differs from TCP: remove its known "
                       f"limit from tests/conformance/exceptions.py and docs/CONFORMANCE.md")
        return
    assert not diffs, ("differs from TCP:\n  " + "\n  ".join(diffs) + "\n\n" + got.describe()
                       + "\n\nTCP: " + tcp.describe())


def test_exceptions_are_documented():
    """Every exception stands in docs/CONFORMANCE.md with its scenario and tier,
    and every scenario it names exists."""
    with open(DOC) as f:
        doc = f.read()
    names = set(harness.scenario_names())
    for (name, tier), known in KNOWN.items():
        assert name in names, f"exceptions.py names no scenario: {name}"
        assert tier in ("kernel", "shm") and known.kind in ("xfail", "limit"), (name, tier, known)
        assert re.search(rf"\|\s*`{re.escape(name)}`\s*\|\s*{tier}\s*\|\s*{known.kind}\s*\|", doc), (
            f"docs/CONFORMANCE.md lists no `{name}` | {tier} | {known.kind} row")
