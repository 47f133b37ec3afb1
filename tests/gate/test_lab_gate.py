"""The gate on a real lab deployment: lab-1node up, phase 2 applied over SSH, then `payctl verify` through nginx at
10.77.0.11 with the server-side checks run inside the node's namespace. Uses the session's shared deployment
(tests/support/labs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from payctl.cli import run
from tests.support.labs import SharedLab

pytestmark = [pytest.mark.slow, pytest.mark.lab, pytest.mark.shared_lab("lab-1node", 2)]


@pytest.fixture
def lab_phase2(shared_lab: SharedLab) -> Path:
    """The session's shared lab-1node deployment at phase 2 (tests/support/labs.py); PAYCTL_HOME is set to it."""
    return shared_lab.home


def test_gate_passes_on_the_lab_with_server_checks(
    lab_phase2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No --phase: the audit log says phase 2 is deployed, so its gate (and its reconciliation check) applies.
    # The latency bounds are loosened: the lab node shares 2 cores with every other test run on the machine, and
    # p95 at 20/s was seen at 155 ms there (the phase's 150 ms is a VM's bound, not this machine's).
    rc = run(["verify", "-i", "lab-1node", "--rps", "20", "--duration", "5s", "--warmup", "1s", "--p95", "1s",
              "--p99", "2s", "--quiet", "--report-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, out.out + out.err
    assert summary["target"] == "http://10.77.0.11" and summary["phase"] == 2
    by = {c["name"]: c for c in summary["criteria"]}
    assert by["event backlog drained"]["passed"] and not by["event backlog drained"]["skipped"]
    assert by["reconciliation balanced"]["passed"] and by["reconciliation balanced"]["measured"].startswith("balanced")
    assert summary["measured"]["functional_fails"] == 0 and summary["gate"]["scenario"] == "mixed"
    assert summary["gate"]["p95_ms"] == 1000 and summary["gate"]["max_error_rate"] == 0.01  # the rest from phase 2
    # The lab node's cgroup gave CPU and memory series: the report's server sections are filled.
    html = (tmp_path / "report.html").read_text()
    assert "CPU per node" in html and "Memory per node" in html and 'data-label="node1"' in html


def test_an_address_outside_the_inventory_is_refused_even_in_the_lab_network(
    lab_phase2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run(["verify", "-i", "lab-1node", "--url", "http://10.77.0.12", "--rps", "5", "--duration", "1s"])
    assert rc == 2
    assert "refusing to send load to 10.77.0.12" in capsys.readouterr().err
