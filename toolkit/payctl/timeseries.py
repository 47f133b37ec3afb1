"""Per-second time series of a k6 run, built while k6 streams its samples (``--out json=`` into a pipe).

k6's JSON output is one line per sample of every metric (about 3 KB per request with the default metrics), far too
much to keep. ``Bucketer.feed(line)`` skips every line except the few metrics needed (``http_req_duration`` points,
whose ``expected_response`` tag says whether the request failed, ``iterations`` and ``dropped_iterations``), so the
cost is a byte-prefix test per line and one ``json.loads`` per request. Each second keeps its latencies until it is
older than the newest sample by ``settle_s``, then shrinks to its percentiles. A log-scale histogram of the measured
window gives the live "p95 so far" without keeping every latency.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_DURATION = b'"metric":"http_req_duration","type":"Point"'
_ITER = b'"metric":"iterations","type":"Point"'
_DROPPED = b'"metric":"dropped_iterations","type":"Point"'
_HIST_BASE = 1.01  # 1 % wide latency bins
_HIST_MIN_MS = 0.001


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (k6's method) of an ascending list; ``q`` in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Second:
    """One second of the run."""

    t: int  # unix time
    warmup_samples: int = 0
    measure_samples: int = 0
    requests: int = 0
    failed: int = 0
    iterations: int = 0
    dropped: int = 0
    latencies: list[float] | None = field(default_factory=list)
    p50: float = math.nan
    p95: float = math.nan
    p99: float = math.nan

    @property
    def stage(self) -> str:
        """The stage most of this second's samples belong to."""
        return "warmup" if self.warmup_samples > self.measure_samples else "measure"

    def settle(self) -> None:
        if self.latencies is not None:
            xs = sorted(self.latencies)
            self.p50, self.p95, self.p99 = percentile(xs, 50), percentile(xs, 95), percentile(xs, 99)
            self.latencies = None


@dataclass(frozen=True)
class Point:
    """One second of the finished series, relative to the start of the run."""

    t: float
    stage: str
    rps: float  # requests
    iterations: int  # completed iterations (one per request except in full-flow)
    dropped: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Live:
    """What the live display shows."""

    elapsed_s: float
    stage: str
    rate: float
    p95_ms: float | None
    requests: int
    errors: int
    dropped: int


class Histogram:
    """Log-scale latency histogram (1 % bins): percentiles of many samples in bounded memory."""

    def __init__(self) -> None:
        self.bins: Counter[int] = Counter()
        self.count = 0

    def add(self, ms: float) -> None:
        self.bins[int(math.log(max(ms, _HIST_MIN_MS) / _HIST_MIN_MS, _HIST_BASE))] += 1
        self.count += 1

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q / 100.0 * self.count
        seen = 0
        for b in sorted(self.bins):
            seen += self.bins[b]
            if seen >= rank:
                return float(_HIST_MIN_MS * _HIST_BASE ** (b + 0.5))
        return None


class Bucketer:
    """Feeds on k6 JSON output lines (thread-safe: a reader thread feeds, the display thread reads)."""

    def __init__(self, settle_s: int = 3) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[int, Second] = {}
        self._newest = 0
        self._settle_s = settle_s
        self._ts_cache: dict[bytes, int] = {}
        self.measured = Histogram()
        self.requests = 0
        self.errors = 0
        self.dropped = 0
        self.lines = 0
        self.bad_lines = 0
        self.statuses: Counter[str] = Counter()  # status codes of the failed measured requests

    def _second(self, stamp: str) -> int:
        key = stamp[:19].encode()
        t = self._ts_cache.get(key)
        if t is None:
            t = int(datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
            if len(self._ts_cache) > 10_000:
                self._ts_cache.clear()
            self._ts_cache[key] = t
        return t

    def feed(self, line: bytes) -> None:
        self.lines += 1
        head = line[:64]
        kind = 1 if _DURATION in head else 2 if _ITER in head else 3 if _DROPPED in head else 0
        if not kind:
            return
        try:
            data = json.loads(line)["data"]
            t = self._second(data["time"])
            value = float(data["value"])
            tags = data.get("tags") or {}
        except (ValueError, KeyError, TypeError):
            self.bad_lines += 1
            return
        stage = str(tags.get("scenario", "measure"))
        with self._lock:
            sec = self._seconds.get(t)
            if sec is None:
                sec = self._seconds[t] = Second(t)
            if stage == "warmup":
                sec.warmup_samples += 1
            else:
                sec.measure_samples += 1
            if kind == 1:
                sec.requests += 1
                if sec.latencies is not None:
                    sec.latencies.append(value)
                failed = tags.get("expected_response") == "false"
                sec.failed += failed
                if stage == "measure":
                    self.requests += 1
                    self.measured.add(value)
                    if failed:
                        self.errors += 1
                        self.statuses[str(tags.get("status", "?"))] += 1
            elif kind == 2:
                sec.iterations += int(value)
            else:
                sec.dropped += int(value)
                if stage == "measure":
                    self.dropped += int(value)
            if t > self._newest:
                self._newest = t
                for s in self._seconds.values():
                    if s.latencies is not None and s.t < t - self._settle_s:
                        s.settle()

    def live(self, elapsed_s: float) -> Live:
        with self._lock:
            last = self._seconds.get(self._newest - 1) or self._seconds.get(self._newest)
            return Live(
                elapsed_s=elapsed_s,
                stage=last.stage if last else "starting",
                rate=float(last.requests) if last else 0.0,
                p95_ms=self.measured.percentile(95),
                requests=self.requests,
                errors=self.errors,
                dropped=self.dropped,
            )

    def series(self) -> list[Point]:
        """The per-second series, from the first sample (t=0) to the last."""
        with self._lock:
            secs = [self._seconds[t] for t in sorted(self._seconds)]
            for s in secs:
                s.settle()
        if not secs:
            return []
        t0 = secs[0].t
        out = []
        for s in secs:
            has = s.requests > 0
            out.append(
                Point(
                    t=float(s.t - t0),
                    stage=s.stage,
                    rps=float(s.requests),
                    iterations=s.iterations,
                    dropped=s.dropped,
                    error_rate=s.failed / s.requests if has else 0.0,
                    p50_ms=s.p50 if has else None,
                    p95_ms=s.p95 if has else None,
                    p99_ms=s.p99 if has else None,
                )
            )
        return out
