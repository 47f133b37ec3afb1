from __future__ import annotations

import pytest

from payctl.errors import ConfigError
from payctl.gate import k6_duration, parse_duration, parse_latency


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("0.5s", 0.5),
        ("0.01ms", 0.00001),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        (".5s", 0.5),
        ("250us", 0.00025),
        ("20", 20.0),
        (" 2m ", 120.0),
        (3, 3.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_units_and_fractions(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "ms"), [("150ms", 150.0), ("0.5s", 500.0), ("0.01ms", 0.01), ("150", 150.0)])
def test_parse_latency_is_in_milliseconds_and_a_bare_number_is_ms(text: str, ms: float) -> None:
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "fast", "5 minutes", "10x", "ms", "-5s", "1s-", "1..5s", "nan", "inf"])
def test_parse_duration_rejects_garbage_with_a_hint(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_duration(text, what="--duration")
    assert "--duration" in exc.value.message
    assert exc.value.hint


def test_parse_latency_rejects_zero() -> None:
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_latency("0ms")


def test_k6_duration_is_whole_milliseconds_and_never_zero() -> None:
    assert k6_duration(120) == "120000ms"
    assert k6_duration(0.5) == "500ms"
    assert k6_duration(0.0001) == "1ms"
    assert k6_duration(1.0005) == "1001ms"
