"""The model fit recovers known parameters; the knee search stops at the first failing step; calibrations predict."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from payctl.calibrate import MAX_STEPS, Calibration, Step, calibrate, find_knee, fit_usl, knee_rates, usl
from payctl.calibration import (
    calibration_path,
    compare_with_plan,
    load,
    mix_factor,
    plan_calibration_for,
    predict_capacity,
    store,
)
from payctl.errors import ConfigError
from payctl.inventory import load_inventory
from payctl.phase import load_phase

NS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def test_usl_fit_recovers_known_parameters_exactly_from_clean_data() -> None:
    xs = [usl(n, 120.0, 0.03, 0.0005) for n in NS]
    f = fit_usl(NS, xs)
    assert f.model == "usl"
    assert f.lam == pytest.approx(120.0, rel=1e-3)
    assert f.sigma == pytest.approx(0.03, rel=1e-2)
    assert f.kappa == pytest.approx(0.0005, rel=1e-2)
    true_peak_n = math.sqrt((1 - 0.03) / 0.0005)
    assert f.peak_concurrency == pytest.approx(true_peak_n, rel=1e-2)
    assert f.peak_rps == pytest.approx(usl(true_peak_n, 120.0, 0.03, 0.0005), rel=1e-3)


def test_usl_fit_recovers_the_peak_from_noisy_data() -> None:
    rng = random.Random(7)
    xs = [usl(n, 200.0, 0.05, 0.001) * (1 + rng.gauss(0, 0.02)) for n in NS]
    f = fit_usl(NS, xs)
    true_peak = usl(math.sqrt(0.95 / 0.001), 200.0, 0.05, 0.001)
    assert f.peak_rps == pytest.approx(true_peak, rel=0.05)
    assert f.lam == pytest.approx(200.0, rel=0.1)


def test_simpler_models_win_when_they_fit_as_well() -> None:
    amdahl = fit_usl(NS, [usl(n, 100.0, 0.05, 0.0) for n in NS])
    assert amdahl.model == "amdahl"
    assert amdahl.kappa == 0 and amdahl.sigma == pytest.approx(0.05, rel=1e-2)
    assert amdahl.peak_rps == pytest.approx(100.0 / 0.05, rel=1e-2)
    linear = fit_usl(NS, [50.0 * n for n in NS])
    assert linear.model == "linear" and linear.lam == pytest.approx(50.0)
    assert math.isinf(linear.peak_rps)


def test_fit_needs_two_points() -> None:
    with pytest.raises(ConfigError):
        fit_usl([1.0], [10.0])


def test_knee_rates_are_bounded() -> None:
    assert knee_rates(100, 500, 100) == [100, 200, 300, 400, 500]
    with pytest.raises(ConfigError, match=f"at most {MAX_STEPS}"):
        knee_rates(1, 1000, 1)
    with pytest.raises(ConfigError):
        knee_rates(500, 100, 100)


def _server(capacity: float, service_ms: float = 2.0):  # type: ignore[no-untyped-def]
    """A step function standing in for the gate: M/M/1-like latency, fails past the capacity."""

    def step(rate: int) -> Step:
        achieved = min(rate, capacity * 0.97)
        util = min(0.99, rate / capacity)
        mean = service_ms / (1 - util)
        ok = rate <= capacity * 0.9
        return Step(rate, achieved, mean, mean * 3, mean * 5, 0.0, 0 if ok else int(rate - achieved), ok,
                    () if ok else ("p95 latency",))  # fmt: skip

    return step


def test_find_knee_stops_at_the_first_failure_and_keeps_it() -> None:
    calls: list[int] = []

    def step(rate: int) -> Step:
        calls.append(rate)
        return _server(1000)(rate)

    knee = find_knee(knee_rates(200, 2000, 200), step)
    assert calls == [200, 400, 600, 800, 1000]
    assert knee.knee_rps == 800
    assert knee.stopped_by is not None and knee.stopped_by.offered_rps == 1000


def test_no_knee_when_the_first_step_fails() -> None:
    knee = find_knee([500, 600], _server(100), descend=0)
    assert knee.knee_rps is None and len(knee.steps) == 1


def test_calibration_is_stored_per_deployment_runtime_and_nodes(tmp_path: Path) -> None:
    knee = find_knee(knee_rates(100, 2000, 100), _server(1000))
    cal = calibrate(knee, deployment="lab", runtime="native", nodes=1, scenario="mixed")
    assert cal.fit is not None and cal.knee_rps == 900
    path = store(cal, tmp_path)
    assert path == calibration_path("lab", tmp_path) == tmp_path / "lab" / "calibration.json"
    store(calibrate(knee, deployment="lab", runtime="compose", nodes=2, scenario="mixed"), tmp_path)
    data = json.loads(path.read_text())
    assert set(data["runtimes"]) == {"native", "compose"}
    back = load("lab", "native", tmp_path)
    assert list(back) == [1]
    assert isinstance(back[1], Calibration)
    assert back[1].knee_rps == 900 and back[1].steps == cal.steps
    assert back[1].fit == cal.fit


def test_prediction_says_when_a_target_is_out_of_reach(tmp_path: Path) -> None:
    assert predict_capacity("lab", "native", 1, 400, home=tmp_path) is None
    knee = find_knee(knee_rates(100, 2000, 100), _server(1000))
    store(calibrate(knee, deployment="lab", runtime="native", nodes=1, scenario="mixed"), tmp_path)
    ok = predict_capacity("lab", "native", 1, 400, phase=1, home=tmp_path)
    assert ok is not None and ok.reachable and ok.predicted_rps == 900
    assert ok.message.startswith("phase 1 target 400 RPS, predicted 900 ± ")
    far = predict_capacity("lab", "native", 2, 2000, phase=5, home=tmp_path)
    assert far is not None and not far.reachable
    assert far.predicted_rps == pytest.approx(900 * 2 * 0.9)
    assert far.message.startswith("phase 5 target 2000 RPS, predicted 1620 ± ")
    assert far.message.endswith("on 2 nodes (extrapolated from a calibration on 1): add a node or raise workers")


def test_the_plan_learns_from_the_measured_knee(tmp_path: Path) -> None:
    inv, phase = load_inventory("lab-1node"), load_phase(1)
    assert plan_calibration_for(inv, phase, tmp_path) is None
    knee = find_knee(knee_rates(100, 2000, 100), _server(1000))
    cal = calibrate(knee, deployment="lab", runtime="native", nodes=1, scenario="mixed")
    store(cal, tmp_path)
    pc = plan_calibration_for(inv, phase, tmp_path)
    assert pc is not None and pc.source.startswith("measured knee 900/s (mixed) on 1 node(s)")
    mix = mix_factor("mixed", phase)
    assert mix == pytest.approx(0.5 + 0.25 + 0.1 + 0.05 * 0.8 + 0.1 * 0.4)
    cmp = compare_with_plan(cal, inv, phase)
    assert cmp is not None and cmp.knee_rps == 900
    assert cmp.off_by_pct == pytest.approx((cmp.planned_rps - 900) / 900)
    assert cmp.calibrated_rps is not None and cmp.calibrated_rps != cmp.planned_rps
    assert cmp.message.startswith(f"the plan predicted {cmp.planned_rps}/s (bottleneck ")
    assert mix_factor("authorize", phase) == 1.0 and mix_factor("full-flow", None) == pytest.approx(3.3)


def test_a_search_that_starts_too_high_halves_down_to_a_knee() -> None:
    calls: list[int] = []
    pauses: list[int] = []

    def step(rate: int) -> Step:
        calls.append(rate)
        return _server(100)(rate)

    knee = find_knee([400, 500], step, between=lambda: pauses.append(len(calls)))
    assert calls == [400, 200, 100, 50]  # 400 fails, then halving until a rate passes (90 is 0.9 x capacity)
    assert knee.knee_rps == 50 and knee.step_rps == 350
    assert pauses == [1, 2, 3]  # a cool-down before every step but the first
    never = find_knee([400], _server(1), descend=2)
    assert [s.offered_rps for s in never.steps] == [400, 200, 100] and never.knee_rps is None


def test_payctl_calibrate_shows_the_plans_error_and_the_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payctl.cli import run

    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    assert run(["calibrate", "-i", "lab-1node", "--phase", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: no calibration for deployment lab (native)" in err
    assert "hint: run payctl verify -i lab-1node --find-knee first" in err
    knee = find_knee(knee_rates(25, 300, 25), _server(80))
    store(calibrate(knee, deployment="lab", runtime="native", nodes=1, scenario="mixed"), tmp_path)
    assert run(["calibrate", "-i", "lab-1node", "--phase", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s): knee 50/s (mixed, 3 steps" in out
    assert "the measured knee is 50/s: off by +" in out
    assert "phase 1 target 400 RPS, predicted 50 ± 12 on 1 node: add a node or raise workers" in out
    assert run(["calibrate", "-i", "lab-2node", "--phase", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prediction"]["nodes"] == 2 and doc["prediction"]["calibrated_nodes"] == 1
    assert doc["prediction"]["reachable"] is False and doc["plan"] is None
