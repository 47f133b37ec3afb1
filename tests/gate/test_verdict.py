"""The verdict on recorded k6 summaries (tests/gate/data, written by loadtest/payments.js's handleSummary)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from payctl.errors import ConfigError
from payctl.gate import GateSpec, K6Summary, judge, passed, spec_from_phase
from payctl.phase import load_phase

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def spec(**kw: Any) -> GateSpec:
    base: dict[str, Any] = {
        "rps": 50, "duration_s": 2.0, "warmup_s": 1.0, "p95_ms": 150.0, "p99_ms": 300.0, "max_error_rate": 0.01
    }  # fmt: skip
    return GateSpec(**{**base, **kw})


def by_name(criteria: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in criteria}


def test_recorded_passing_run_passes_every_criterion() -> None:
    s = K6Summary.from_k6(recorded("k6-summary-pass.json"), duration_s=2.0, offered_rps=50)
    assert s.iterations == 101 and s.requests == 101 and s.dropped == 0
    assert s.achieved_rps == pytest.approx(50.5)
    assert s.p95_ms is not None and 0 < s.p95_ms < 150
    criteria = judge(s, spec())
    assert [c.name for c in criteria] == [
        "achieved rate", "p95 latency", "p99 latency", "error rate", "functional checks"
    ]  # fmt: skip
    assert passed(criteria), criteria


def test_dropped_iterations_fail_the_rate_with_measured_and_limit() -> None:
    s = K6Summary.from_k6(recorded("k6-summary-dropped.json"), duration_s=2.0, offered_rps=600)
    assert s.dropped == 580 and s.iterations == 621
    c = by_name(judge(s, spec(rps=600)))
    assert not c["achieved rate"].passed
    assert c["achieved rate"].measured == "310.5/s (621 iterations in 2s, 580 dropped)"
    assert c["achieved rate"].limit == ">= 588.0/s (98% of 600)"
    assert c["p95 latency"].passed and c["error rate"].passed


def test_rate_at_exactly_98_percent_passes_and_just_below_fails() -> None:
    data = recorded("k6-summary-pass.json")
    data["metrics"]["iterations{scenario:measure}"]["values"]["count"] = 98
    assert by_name(judge(K6Summary.from_k6(data, duration_s=2.0, offered_rps=50), spec()))["achieved rate"].passed
    data["metrics"]["iterations{scenario:measure}"]["values"]["count"] = 97
    assert not by_name(judge(K6Summary.from_k6(data, duration_s=2.0, offered_rps=50), spec()))["achieved rate"].passed


def test_impossible_p95_fails_p95_only() -> None:
    s = K6Summary.from_k6(recorded("k6-summary-pass.json"), duration_s=2.0, offered_rps=50)
    c = by_name(judge(s, spec(p95_ms=0.01, p99_ms=300.0)))
    assert not c["p95 latency"].passed
    assert c["p95 latency"].limit == "<= 0.01ms"
    assert c["p99 latency"].passed and c["achieved rate"].passed


def test_error_rate_and_functional_failures() -> None:
    data = copy.deepcopy(recorded("k6-summary-pass.json"))
    failed = data["metrics"]["http_req_failed{scenario:measure}"]["values"]
    failed.update({"passes": 2, "fails": 99, "rate": 2 / 101})
    data["metrics"]["checks{scenario:measure,kind:functional}"]["values"].update({"fails": 1})
    c = by_name(judge(K6Summary.from_k6(data, duration_s=2.0, offered_rps=50), spec()))
    assert not c["error rate"].passed
    assert c["error rate"].measured == "1.98% (2 of 101 requests)"
    assert not c["functional checks"].passed
    # a looser limit accepts the same errors
    assert by_name(judge(K6Summary.from_k6(data, duration_s=2.0, offered_rps=50), spec(max_error_rate=0.05)))[
        "error rate"
    ].passed


def test_zero_error_budget_means_no_failed_request() -> None:
    s = K6Summary.from_k6(recorded("k6-summary-pass.json"), duration_s=2.0, offered_rps=50)
    c = by_name(judge(s, spec(max_error_rate=0.0)))
    assert c["error rate"].passed and c["error rate"].limit == "no failed request"


def test_a_run_that_measured_nothing_fails() -> None:
    s = K6Summary.from_k6({"metrics": {}}, duration_s=2.0, offered_rps=50)
    criteria = judge(s, spec())
    assert not any(c.passed for c in criteria)


def test_summary_export_format_without_values_nesting_is_read_too() -> None:
    data = recorded("k6-summary-pass.json")
    flat = {"metrics": {k: v["values"] for k, v in data["metrics"].items()}}
    assert K6Summary.from_k6(flat, duration_s=2.0, offered_rps=50) == K6Summary.from_k6(
        data, duration_s=2.0, offered_rps=50
    )


def test_spec_from_phase_takes_the_gate_and_overrides() -> None:
    phase = load_phase(5)
    s = spec_from_phase(phase, rps=20, duration_s=None)
    assert s.rps == 20 and s.duration_s == 600 and s.p95_ms == 150 and s.merchants == 200
    assert s.scenario == "mixed" and s.mix["void"] == pytest.approx(0.05)


def test_spec_without_phase_needs_every_value() -> None:
    with pytest.raises(ConfigError, match="missing: duration_s"):
        spec_from_phase(None, rps=10, warmup_s=0, p95_ms=1, p99_ms=2, max_error_rate=0.01)


def test_invalid_spec_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as exc:
        spec(rps=0, p95_ms=300.0, p99_ms=100.0, max_error_rate=1.5)
    assert exc.value.exit_code == 2
    assert len(exc.value.problems) == 3


def test_deployed_phase_comes_from_the_local_audit_log(tmp_path: Path) -> None:
    from payctl.gate import deployed_phase

    assert deployed_phase("lab", tmp_path) is None
    log = tmp_path / "lab" / "audit.jsonl"
    log.parent.mkdir()

    def rec(command: str, phase: int | None, result: str) -> str:
        return json.dumps({"deployment": "lab", "command": command, "phase": phase, "result": result}) + "\n"

    log.write_text(rec("phase1 apply", 1, "ok") + rec("phase3 apply", 3, "failed") + "not json\n")
    assert deployed_phase("lab", tmp_path) == 1
    log.write_text(log.read_text() + rec("phase3 apply", 3, "gate-failed"))
    assert deployed_phase("lab", tmp_path) == 3  # a failed gate leaves the deployment as applied
    log.write_text(log.read_text() + rec("down", None, "ok"))
    assert deployed_phase("lab", tmp_path) is None
