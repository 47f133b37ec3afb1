"""The rendered alert rules: promtool's unit tests fire past each limit and stay quiet below it, and a rule file
with a wrong threshold or a wrong 'growing' condition is caught by those same tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.monitoring.conftest import rendered

ALERTS = ("PaymentLatencyP95High", "PaymentErrorRateHigh", "NodeCpuHigh", "DiskFillingUp", "ConsumerLagGrowing",
          "OutboxBacklog", "ReplicaLagHigh", "SemiSyncFellBackToAsync", "TargetDown",
          "KafkaUnderReplicatedPartitions")  # fmt: skip


def _promtool_test(tmp: Path, rules: str, tests: str) -> subprocess.CompletedProcess[str]:
    (tmp / "payctl.rules.yml").write_text(rules)
    (tmp / "payctl.rules.test.yml").write_text(tests)
    return subprocess.run(["promtool", "test", "rules", "payctl.rules.test.yml"], cwd=tmp, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def files() -> tuple[str, str]:
    f = rendered("ktcloud-2node", 5)
    return f["node1/prometheus/rules/payctl.rules.yml"], f["node1/prometheus/rules/payctl.rules.test.yml"]


def test_every_limit_has_a_firing_and_rules_pass(files: tuple[str, str], tmp_path: Path) -> None:
    rules, tests = files
    for name in ALERTS:
        assert f"alert: {name}" in rules
        assert f"alertname: {name}" in tests
    r = _promtool_test(tmp_path, rules, tests)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("wrong", "right", "alert"), [
    ("> 0.15", "> 0.05", "PaymentLatencyP95High"),  # fires on the quiet (fast) case
    ("> 0.01", "> 0.2", "PaymentErrorRateHigh"),  # stays quiet on the firing (9 %) case
    ("> 0.85", "> 0.4", "NodeCpuHigh"),  # the 50 % node fires too
    ("[10m:1m]) > 0", "[10m:1m]) >= 0", "ConsumerLagGrowing"),  # a flat lag fires
    ('route!~"/metrics|/health"', 'route!~"/health"', "PaymentLatencyP95High"),  # slow scrapes count
    ("(kafka_server_under_replicated_partitions) > 0", "(kafka_server_under_replicated_partitions) >= 0",
     "KafkaUnderReplicatedPartitions"),  # the in-sync node fires too
])  # fmt: skip
def test_a_wrong_rule_fails_its_unit_test(files: tuple[str, str], tmp_path: Path, wrong: str, right: str,
                                          alert: str) -> None:
    rules, tests = files
    assert wrong in rules
    r = _promtool_test(tmp_path, rules.replace(wrong, right), tests)
    assert r.returncode != 0
    assert alert in r.stdout + r.stderr


@pytest.fixture(scope="module")
def lab_files() -> tuple[str, str]:
    f = rendered("lab-2node", 4)
    return f["node1/prometheus/rules/payctl.rules.yml"], f["node1/prometheus/rules/payctl.rules.test.yml"]


def test_lab_cpu_and_memory_come_from_the_hosts_cgroup(lab_files: tuple[str, str], tmp_path: Path) -> None:
    """Lab hosts share /proc: the lab's figures and CPU alert read the host's cgroup series, as a share of its quota;
    the promtool cases fire at 90 % of a 2-core quota and stay quiet at 1 of 2 cores."""
    rules, tests = lab_files
    assert "node_cpu_seconds_total" not in rules.replace("payctl_lab_node_cpu_seconds_total", "")
    assert "node_memory_MemAvailable_bytes" not in rules
    assert "payctl_lab_node_memory_usage_bytes" in rules and "payctl_lab_node_cpu_limit_cores" in rules
    r = _promtool_test(tmp_path, rules, tests)
    assert r.returncode == 0, r.stdout + r.stderr
    forgot_quota = rules.replace(" / sum by (node) (payctl_lab_node_cpu_limit_cores)) >", ") >")
    assert forgot_quota != rules
    r = _promtool_test(tmp_path, forgot_quota, tests)
    assert r.returncode != 0 and "NodeCpuHigh" in r.stdout + r.stderr
