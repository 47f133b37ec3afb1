"""Per-second series from k6's JSON output lines (the format k6 1.1 writes with --out json=)."""

from __future__ import annotations

import json
import math

import pytest

from payctl.timeseries import Bucketer, Histogram, percentile


def point(metric: str, t: str, value: float, scenario: str = "measure", ok: bool = True, status: int = 200) -> bytes:
    tags = {"expected_response": "true" if ok else "false", "name": "authorize", "scenario": scenario}
    tags["status"] = str(status)
    line = {"metric": metric, "type": "Point", "data": {"time": t, "value": value, "tags": tags}}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


META = (
    b'{"type":"Metric","data":{"name":"http_req_duration","type":"trend","contains":"time","thresholds":[],'
    b'"submetrics":null},"metric":"http_req_duration"}\n'
)


def test_k6_line_layout_matches_what_the_bucketer_looks_for() -> None:
    # A line copied from k6 1.1's output: the byte prefix test must accept it.
    real = (
        b'{"metric":"http_req_duration","type":"Point","data":{"time":"2026-11-25T13:29:01.687021322Z",'
        b'"value":1.580518,"tags":{"expected_response":"true","name":"authorize","scenario":"warmup",'
        b'"status":"200"}}}\n'
    )
    b = Bucketer()
    b.feed(real)
    b.feed(META)
    (p,) = b.series()
    assert p.stage == "warmup" and p.rps == 1 and p.p95_ms == pytest.approx(1.580518)


def test_seconds_hold_rate_percentiles_errors_and_dropped() -> None:
    b = Bucketer(settle_s=1)
    for i in range(100):  # second 0: warm-up, 100 requests of 1..100 ms
        b.feed(point("http_req_duration", f"2026-11-25T10:00:00.{i * 1000:06d}Z", float(i + 1), "warmup"))
        b.feed(point("iterations", "2026-11-25T10:00:00.5Z", 1, "warmup"))
    for i in range(50):  # second 1: measured, 5 failures (503)
        b.feed(point("http_req_duration", "2026-11-25T10:00:01.1Z", 2.0, ok=i >= 5, status=200 if i >= 5 else 503))
    b.feed(point("dropped_iterations", "2026-11-25T10:00:01.9Z", 1))
    b.feed(point("dropped_iterations", "2026-11-25T10:00:01.9Z", 1))
    for _ in range(10):  # second 3 (second 2 had nothing)
        b.feed(point("http_req_duration", "2026-11-25T10:00:03.0Z", 4.0))
    s0, s1, s3 = b.series()
    assert (s0.t, s0.stage, s0.rps, s0.iterations) == (0.0, "warmup", 100.0, 100)
    assert s0.p50_ms == pytest.approx(50.5) and s0.p95_ms == pytest.approx(95.05) and s0.p99_ms == pytest.approx(99.01)
    assert (s1.t, s1.stage, s1.rps, s1.dropped) == (1.0, "measure", 50.0, 2)
    assert s1.error_rate == pytest.approx(0.1)
    assert s3.t == 3.0 and s3.p50_ms == 4.0
    assert b.requests == 60 and b.errors == 5 and b.dropped == 2  # measured window only
    assert dict(b.statuses) == {"503": 5}
    live = b.live(4.0)
    assert live.requests == 60 and live.errors == 5 and live.p95_ms == pytest.approx(4.0, rel=0.02)


def test_unrelated_and_broken_lines_are_skipped() -> None:
    b = Bucketer()
    b.feed(point("http_req_blocked", "2026-11-25T10:00:00Z", 1.0))
    b.feed(point("data_sent", "2026-11-25T10:00:00Z", 100.0))
    b.feed(b'{"metric":"http_req_duration","type":"Point","data":{"time":"garbage"}}\n')
    assert b.series() == [] and b.bad_lines == 1 and b.lines == 3


def test_percentile_interpolates_like_k6() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_histogram_percentiles_are_within_one_percent() -> None:
    h = Histogram()
    for i in range(1, 10001):
        h.add(i / 100)  # 0.01 .. 100 ms
    p95 = h.percentile(95)
    assert p95 is not None and p95 == pytest.approx(95.0, rel=0.01)
    assert Histogram().percentile(95) is None
