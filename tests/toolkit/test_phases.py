from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from payctl.errors import ConfigError
from payctl.paths import data_dir
from payctl.phase import PHASES, load_phase


def test_phases_are_cumulative() -> None:
    previous: tuple[str, ...] = ()
    for n in PHASES:
        phase = load_phase(n)
        assert phase.number == n
        assert phase.features[: len(previous)] == previous
        assert set(phase.new_features) <= set(phase.features)
        assert not set(phase.new_features) & set(previous)
        previous = phase.features
    assert load_phase(2).has("settlement") and not load_phase(1).has("settlement")
    assert load_phase(5).has("nginx_lb") and load_phase(5).has("monitoring")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gates_of_phases_1_to_4(n: int) -> None:
    gate = load_phase(n).gate
    assert (gate.rps, gate.p95_ms, gate.max_error_rate) == (400, 150, 0.01)
    assert gate.p99_ms >= gate.p95_ms and gate.duration_s > 0 and gate.merchants > 0
    assert abs(sum(gate.mix.values()) - 1) < 1e-9


def test_phase5_gate_and_requirements() -> None:
    phase = load_phase(5)
    assert phase.gate.rps == 1000
    assert phase.requires.min_app_nodes == 2 and phase.requires.nodes == ("node2",)


def test_functional_checks_accumulate() -> None:
    assert "reconciliation_balanced" not in load_phase(1).gate.checks
    assert "reconciliation_balanced" in load_phase(2).gate.checks
    assert "ledger_balanced" in load_phase(5).gate.checks  # phase 1's check still holds at phase 5


def test_rate_limits() -> None:
    for n in PHASES:
        limits = load_phase(n).rate_limits
        assert (limits.authorize, limits.capture, limits.refund) == (30000, 30000, 15000)


def test_phase_is_frozen() -> None:
    with pytest.raises(ValueError):
        load_phase(1).gate.rps = 1  # type: ignore[misc]


def test_unknown_phase() -> None:
    with pytest.raises(ConfigError) as info:
        load_phase(6)
    assert (info.value.message, info.value.hint, info.value.exit_code) == (
        "no phase 6",
        "phases are 1, 2, 3, 4 and 5",
        2,
    )


def test_bad_phase_file_is_one_config_error(tmp_path: Path) -> None:
    for f in data_dir("phases").glob("phase*.yml"):
        shutil.copy(f, tmp_path / f.name)
    data = yaml.safe_load((tmp_path / "phase2.yml").read_text())
    data["features"].append("telepathy")
    data["gate"]["mix"] = {"authorize": 0.5}
    (tmp_path / "phase2.yml").write_text(yaml.safe_dump(data))
    load_phase(1, tmp_path)  # phase 1 does not read phase 2
    with pytest.raises(ConfigError) as info:
        load_phase(3, tmp_path)
    assert info.value.message == f"{tmp_path / 'phase2.yml'}: invalid phase file"
    assert info.value.problems[0].startswith("features[3]: must be one of 'nginx_lb'")
    assert info.value.problems[1] == "gate: mix weights must be >= 0 and sum to 1 (they sum to 0.5)"


def test_producer_batching_is_the_teams_plan_and_renders_into_the_app_env() -> None:
    from payctl.inventory import load_inventory
    from payctl.plan import make_plan

    assert load_phase(2).producer is None
    for n in (3, 4, 5):
        producer = load_phase(n).producer
        assert producer is not None
        assert (producer.batch_bytes, producer.linger_ms, producer.compression) == (16384, 10, "lz4")
    env = dict(make_plan(load_inventory("ktcloud-1node"), load_phase(3)).nodes[0].app.env)  # type: ignore[union-attr]
    assert (env["PAYAPP_KAFKA_BATCH_SIZE"], env["PAYAPP_KAFKA_LINGER_MS"], env["PAYAPP_KAFKA_COMPRESSION"]) == (
        "16384", "10", "lz4")  # fmt: skip


def test_producer_batching_without_its_settings_names_the_file(tmp_path: Path) -> None:
    for f in data_dir("phases").glob("phase*.yml"):
        shutil.copy(f, tmp_path / f.name)
    data = yaml.safe_load((tmp_path / "phase3.yml").read_text())
    del data["producer"]
    (tmp_path / "phase3.yml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_phase(3, tmp_path)
    assert info.value.message == f"{tmp_path / 'phase3.yml'}: feature producer_batching without a 'producer' block"
    assert "linger_ms: 10" in (info.value.hint or "")
