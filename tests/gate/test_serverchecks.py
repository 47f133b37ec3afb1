"""Server-side criteria over a command runner: the runner is our seam (the deploy engine supplies an SSH one)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from payctl.phase import load_phase
from payctl.serverchecks import (
    BacklogDrained,
    CommandResult,
    ReconciliationBalanced,
    local_runner,
    parse_lag,
    payapp_checks,
    run_server_checks,
)


class Script:
    """Answers each command with the next canned result, and records what was run."""

    def __init__(self, results: list[CommandResult]) -> None:
        self.results = results
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append(list(argv))
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.mark.parametrize(
    ("text", "lag"),
    [
        ('{"total": 12}', 12),
        ('{"lag": 0}', 0),
        ('{"groups": {"settlement": {"partitions": [{"lag": 3}, {"lag": 4}]}}}', 7),
        ('[{"topic": "payment.events", "partition": 0, "lag": 5}, {"partition": 1, "lag": 1}]', 6),
        ("group settlement  topic payment.events\n  p0 lag 2\n  p1 lag 3\n", 5),
        ("total lag: 0\n", 0),
        ("nothing useful here", None),
    ],
)
def test_parse_lag_reads_json_and_text(text: str, lag: int | None) -> None:
    assert parse_lag(text) == lag


def test_backlog_drained_polls_until_zero() -> None:
    clock = Clock()
    runner = Script([CommandResult(0, '{"total": 40}', ""), CommandResult(0, '{"total": 5}', ""),
                     CommandResult(0, '{"total": 0}', "")])  # fmt: skip
    c = BacklogDrained(runner, ("payapp",), bound_s=10, clock=clock, sleep=clock.sleep).run(300)
    assert c.passed and c.measured == "lag 0 after 2.0s" and c.limit == "0 within 10s"
    assert runner.calls == [["payapp", "lag"]] * 3


def test_backlog_not_drained_within_the_bound_fails_with_the_last_lag() -> None:
    clock = Clock()
    runner = Script([CommandResult(0, '{"total": 900}', "")])
    c = BacklogDrained(runner, bound_s=5, clock=clock, sleep=clock.sleep).run(300)
    assert not c.passed and c.measured == "lag 900 after 5.0s"


def test_lag_command_failure_is_a_failed_criterion_with_its_output() -> None:
    clock = Clock()
    runner = Script([CommandResult(1, "", "kafka: no brokers available")])
    c = BacklogDrained(runner, bound_s=2, clock=clock, sleep=clock.sleep).run(300)
    assert not c.passed and c.measured == "lag unknown" and "no brokers available" in c.detail


def test_reconciliation_balanced_and_not() -> None:
    ok = ReconciliationBalanced(Script([CommandResult(0, "reconciliation report 42 written: balanced\n", "")]))
    c = ok.run(300)
    assert c.passed and c.measured == "balanced (report 42)"
    bad = ReconciliationBalanced(Script([CommandResult(3, "report_id=43 UNBALANCED\npayment 1234: settled 0\n", "")]))
    c = bad.run(300)
    assert not c.passed and c.measured == "not balanced: exit 3 (report 43)" and "payment 1234" in c.detail


def test_checks_that_do_not_apply_to_the_phase_are_skipped_not_passed() -> None:
    runner = Script([CommandResult(0, '{"total": 0}', "")])
    checks = payapp_checks(runner)
    phase1 = run_server_checks(checks, load_phase(1))
    assert [(c.name, c.skipped) for c in phase1] == [
        ("event backlog drained", False),
        ("reconciliation balanced", True),
    ]
    assert phase1[1].detail == "not part of phase 1"
    phase2 = run_server_checks(checks, load_phase(2))
    assert not any(c.skipped for c in phase2)
    assert all(c.skipped for c in run_server_checks(checks, None))


def test_local_runner_runs_real_commands(tmp_path: Path) -> None:
    fake_payapp = tmp_path / "payapp.py"
    fake_payapp.write_text("import sys\nprint('{\"total\": 0}' if sys.argv[1] == 'lag' else 'report 7')\n")
    checks = payapp_checks(local_runner(), payapp=(sys.executable, str(fake_payapp)))
    results = run_server_checks(checks, load_phase(2))
    assert [c.passed for c in results] == [True, True]
    assert results[1].measured == "balanced (report 7)"
    missing = local_runner()(["/nonexistent/payapp", "lag"], 5)
    assert missing.returncode == 127


def test_payapps_own_output_formats_are_read() -> None:
    # What app/payapp/eventcli.py prints: `payapp lag` one line per partition then the total; `payapp reconcile`
    # one line per report, exit 3 when unbalanced.
    lag = (
        "TopicPartition(topic='payment.events', partition=0)\t3\n"
        "TopicPartition(topic='payment.events', partition=1)\t0\ntotal\t3\n"
    )
    assert parse_lag(lag) == 3
    balanced = "report 12 2026-11-25 balanced=true debit=5000 credit=5000 payments=10 captures=4 mismatched=-\n"
    c = ReconciliationBalanced(Script([CommandResult(0, balanced, "")])).run(60)
    assert c.passed and c.measured == "balanced (report 12)"
    unbalanced = balanced.replace("balanced=true", "balanced=false").replace("mismatched=-", "mismatched=77")
    c = ReconciliationBalanced(Script([CommandResult(3, unbalanced, "")])).run(60)
    assert not c.passed and c.measured == "not balanced: exit 3 (report 12)" and "mismatched=77" in c.detail


def test_the_default_payapp_is_the_one_next_to_this_python() -> None:
    from payctl.serverchecks import local_payapp

    runner = Script([CommandResult(0, "total\t0\n", "")])
    run_server_checks(payapp_checks(runner), load_phase(1))
    assert runner.calls == [[*local_payapp(), "lag"]]
    assert local_payapp() == (str(Path(sys.executable).parent / "payapp"),)  # the venv ships payapp


def test_reconcile_that_could_not_run_is_not_called_unbalanced() -> None:
    err = "payapp: error: cannot connect to MariaDB: (1130, Host 10.77.0.1 is not allowed to connect)\n"
    c = ReconciliationBalanced(Script([CommandResult(1, "", err)])).run(60)
    assert not c.passed and c.measured == "reconciliation did not run: exit 1" and "1130" in c.detail


def test_netns_runner_runs_inside_the_namespace(tmp_path: Path) -> None:
    import os
    import subprocess

    from payctl.serverchecks import netns_runner

    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); CI runs as root")
    ns = f"pgate-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = netns_runner(ns)(["ip", "-o", "link", "show"], 10)
        assert res.returncode == 0
        links = [line.split(":")[1].strip() for line in res.stdout.splitlines()]
        assert links == ["lo"]  # a fresh namespace holds only its loopback: the command ran in there
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
