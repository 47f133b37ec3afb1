"""Knee search and calibration: what a deployment really carries, stored so the plan can predict capacity.

* ``knee_rates`` / ``find_knee``: step the offered rate (bounded number of steps) until the gate fails; the knee is the
  highest passing rate, the curve every step measured.
* ``fit_usl``: the Universal Scalability Law X(N) = lambda*N / (1 + sigma*(N-1) + kappa*N*(N-1)), fitted by least
  squares (grid search over sigma and kappa with lambda solved in closed form, then a local refinement; no scipy).
  N is the concurrency the server held at each step, from Little's law (N = throughput x mean latency). Amdahl
  (kappa = 0) or linear (sigma = kappa = 0) is kept instead when it fits as well (sum of squares within 10 %).
* ``calibrate``: the knee and the fit as one ``Calibration`` record (``payctl.calibration`` stores it and predicts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from payctl.errors import ConfigError

MAX_STEPS = 25


# --------------------------------------------------------------------------------------------------- the model


def usl(n: float, lam: float, sigma: float, kappa: float) -> float:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


@dataclass(frozen=True)
class UslFit:
    model: str  # "usl", "amdahl" or "linear"
    lam: float
    sigma: float
    kappa: float
    sse: float
    rmse: float
    points: int

    def predict(self, n: float) -> float:
        return usl(n, self.lam, self.sigma, self.kappa)

    @property
    def peak_concurrency(self) -> float:
        if self.kappa > 0:
            return math.sqrt(max(1e-12, 1 - self.sigma) / self.kappa)
        return math.inf

    @property
    def peak_rps(self) -> float:
        """The throughput ceiling: X at the peak concurrency (USL), lambda/sigma (Amdahl), unbounded (linear)."""
        if self.kappa > 0:
            return self.predict(self.peak_concurrency)
        if self.sigma > 0:
            return self.lam / self.sigma
        return math.inf


def _lam_sse(ns: Sequence[float], xs: Sequence[float], sigma: float, kappa: float) -> tuple[float, float]:
    g = [n / (1 + sigma * (n - 1) + kappa * n * (n - 1)) for n in ns]
    gg = sum(v * v for v in g)
    lam = sum(x * v for x, v in zip(xs, g, strict=True)) / gg if gg > 0 else 0.0
    sse = sum((x - lam * v) ** 2 for x, v in zip(xs, g, strict=True))
    return lam, sse


def _grid(lo: float, hi: float, count: int) -> list[float]:
    return [0.0] + [lo * (hi / lo) ** (i / (count - 1)) for i in range(count)]


def _fit(
    ns: Sequence[float], xs: Sequence[float], free_sigma: bool, free_kappa: bool
) -> tuple[float, float, float, float]:
    sigmas = _grid(1e-5, 0.99, 40) if free_sigma else [0.0]
    kappas = _grid(1e-7, 0.5, 40) if free_kappa else [0.0]
    best = (math.inf, 0.0, 0.0, 0.0)
    for s in sigmas:
        for k in kappas:
            lam, sse = _lam_sse(ns, xs, s, k)
            if sse < best[0]:
                best = (sse, lam, s, k)
    sse, lam, s, k = best
    # Local refinement: pattern search in log space around the best grid point, shrinking the step.
    step = 0.5
    for _ in range(500):  # bounded: near sigma or kappa = 0 the search could creep towards 0 forever
        if step <= 1e-4:
            break
        improved = False
        for ds, dk in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            s2 = s * math.exp(ds * step) if s > 0 else (1e-6 if ds > 0 else 0.0)
            k2 = k * math.exp(dk * step) if k > 0 else (1e-8 if dk > 0 else 0.0)
            if not free_sigma:
                s2 = 0.0
            if not free_kappa:
                k2 = 0.0
            if s2 >= 1:
                continue
            lam2, sse2 = _lam_sse(ns, xs, s2, k2)
            if sse2 < sse * (1 - 1e-12) - 1e-15:
                sse, lam, s, k, improved = sse2, lam2, s2, k2, True
        if not improved:
            step /= 2
    return lam, s, k, sse


def fit_usl(ns: Sequence[float], xs: Sequence[float], *, simpler_within: float = 0.10) -> UslFit:
    """Least-squares USL fit of throughput ``xs`` at concurrency ``ns``; a simpler model when it fits as well."""
    if len(ns) != len(xs) or len(ns) < 2:
        raise ConfigError("fitting a model needs at least 2 measured points", hint="run more knee-search steps")
    if any(n <= 0 for n in ns) or any(x < 0 for x in xs):
        raise ConfigError("concurrency must be > 0 and throughput >= 0", hint="drop the steps that measured nothing")
    fits = {
        "usl": _fit(ns, xs, True, True),
        "amdahl": _fit(ns, xs, True, False),
        "linear": _fit(ns, xs, False, False),
    }
    best_sse = fits["usl"][3]
    chosen = "usl"
    for name in ("linear", "amdahl"):
        if fits[name][3] <= best_sse * (1 + simpler_within) + 1e-9:
            chosen = name
            break
    lam, s, k, sse = fits[chosen]
    return UslFit(chosen, lam, s, k, sse, math.sqrt(sse / len(ns)), len(ns))


# ------------------------------------------------------------------------------------------------ knee search


@dataclass(frozen=True)
class Step:
    """One rate of the knee search, as the gate judged it."""

    offered_rps: int
    achieved_rps: float
    mean_ms: float
    p95_ms: float | None
    p99_ms: float | None
    error_rate: float
    dropped: int
    passed: bool
    failed: tuple[str, ...] = ()

    @property
    def concurrency(self) -> float:
        """Little's law: requests in the system = throughput x time in the system."""
        return self.achieved_rps * self.mean_ms / 1000.0


@dataclass(frozen=True)
class Knee:
    steps: tuple[Step, ...]
    knee_rps: int | None  # highest passing rate; None when even the first step failed
    step_rps: int

    @property
    def stopped_by(self) -> Step | None:
        return next((s for s in self.steps if not s.passed), None)


def knee_rates(start: int, stop: int, step: int) -> list[int]:
    """The rates to try, ``start`` to ``stop`` inclusive; refuses more than MAX_STEPS (each step is a load run)."""
    if start <= 0 or step <= 0 or stop < start:
        raise ConfigError(
            f"knee search --from {start} --to {stop} --step-size {step}: need 0 < from <= to and step-size > 0",
            hint="e.g. --from 100 --to 1000 --step-size 100",
        )
    rates = list(range(start, stop + 1, step))
    if len(rates) > MAX_STEPS:
        raise ConfigError(
            f"knee search would run {len(rates)} steps (at most {MAX_STEPS})",
            hint="raise --step-size or narrow --from/--to",
        )
    return rates


def find_knee(
    rates: Sequence[int],
    run_step: Callable[[int], Step],
    on_step: Callable[[Step], None] | None = None,
    *,
    descend: int = 4,
    between: Callable[[], None] | None = None,
) -> Knee:
    """Run ``run_step`` at each rate in order until one fails the gate (that step is kept: it bounds the knee).

    When the very first rate fails, halve it up to ``descend`` times until one passes, so a search that started too
    high still finds a knee. ``between`` runs before every step but the first (a cool-down, so the queues a failed
    step left behind do not count against the next one).
    """
    steps: list[Step] = []

    def one(rate: int) -> Step:
        if steps and between is not None:
            between()
        step = run_step(rate)
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return step

    for rate in rates:
        if not one(rate).passed:
            break
    rate = rates[0]
    while steps and not any(s.passed for s in steps) and descend > 0 and rate > 1:
        rate, descend = max(1, rate // 2), descend - 1
        one(rate)
    passing = [s.offered_rps for s in steps if s.passed]
    step_size = rates[1] - rates[0] if len(rates) > 1 else rates[0]
    if passing and max(passing) < rates[0]:
        step_size = rates[0] - max(passing)  # found by halving: the resolution is the gap to the first rate
    return Knee(tuple(steps), max(passing) if passing else None, step_size)


# ------------------------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class Calibration:
    deployment: str
    runtime: str
    nodes: int
    scenario: str
    knee_rps: int | None
    step_rps: int
    steps: tuple[Step, ...]
    fit: UslFit | None
    peak_stderr: float | None = None
    measured_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [{**asdict(s), "concurrency": s.concurrency} for s in self.steps]
        if self.fit is not None:
            peak = self.fit.peak_rps
            d["fit"] = {**asdict(self.fit), "peak_rps": peak if math.isfinite(peak) else None}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        fit = d.get("fit")
        steps = tuple(
            Step(**{k: v for k, v in s.items() if k != "concurrency"} | {"failed": tuple(s.get("failed", ()))})
            for s in d["steps"]
        )
        return cls(
            deployment=d["deployment"],
            runtime=d["runtime"],
            nodes=int(d["nodes"]),
            scenario=d["scenario"],
            knee_rps=d["knee_rps"],
            step_rps=int(d["step_rps"]),
            steps=steps,
            fit=UslFit(**{k: v for k, v in fit.items() if k != "peak_rps"}) if fit else None,
            peak_stderr=d.get("peak_stderr"),
            measured_at=float(d.get("measured_at", 0)),
        )


def _jackknife_peak(ns: Sequence[float], xs: Sequence[float], model: str) -> float | None:
    """Standard error of the fitted peak by leave-one-out, refitting ``model`` (needs 4+ points, a finite peak)."""
    if len(ns) < 4 or model == "linear":
        return None
    peaks = []
    for i in range(len(ns)):
        sub_n = [n for j, n in enumerate(ns) if j != i]
        sub_x = [x for j, x in enumerate(xs) if j != i]
        lam, s, k, sse = _fit(sub_n, sub_x, True, model == "usl")
        f = UslFit(model, lam, s, k, sse, 0.0, len(sub_n))
        if math.isfinite(f.peak_rps):
            peaks.append(f.peak_rps)
    if len(peaks) < 3:
        return None
    mean = sum(peaks) / len(peaks)
    m = len(peaks)
    return math.sqrt((m - 1) / m * sum((p - mean) ** 2 for p in peaks))


def calibrate(knee: Knee, *, deployment: str, runtime: str, nodes: int, scenario: str) -> Calibration:
    """The knee plus a fitted model over the steps that measured something."""
    usable = [s for s in knee.steps if s.achieved_rps > 0 and s.mean_ms > 0]
    ns = [s.concurrency for s in usable]
    xs = [s.achieved_rps for s in usable]
    fit = fit_usl(ns, xs) if len(usable) >= 2 else None
    return Calibration(
        deployment=deployment,
        runtime=runtime,
        nodes=nodes,
        scenario=scenario,
        knee_rps=knee.knee_rps,
        step_rps=knee.step_rps,
        steps=knee.steps,
        fit=fit,
        peak_stderr=_jackknife_peak(ns, xs, fit.model) if fit is not None else None,
    )
