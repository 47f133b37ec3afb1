"""The verify gate: what a run must prove, and the verdict on what k6 measured.

* ``GateSpec``: the criteria of one run (rate, latency bounds, error rate, duration, scenario ...), built from a phase's
  gate and the command-line overrides by ``spec_from_phase``.
* ``parse_duration`` / ``parse_latency``: ``500ms``, ``0.5s``, ``0.01ms``, ``2m``, ``1m30s`` (a bare number is seconds
  for durations and milliseconds for latencies).
* ``check_target``: the safety rule. Load goes only to loopback or to an address of the inventory; anything else
  (another host name, a documentation address that is not in the inventory) is refused before any packet is sent.
* ``K6Summary.from_k6`` reads the measured window out of k6's end-of-test summary, and ``judge`` turns it into one
  ``Criterion`` per rule (measured vs limit). Server-side criteria come from ``payctl.serverchecks``.

Nothing here starts k6 (that is ``payctl.loadrun``) or prints.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from payctl.errors import ConfigError
from payctl.inventory import Inventory
from payctl.paths import payctl_home
from payctl.phase import Phase

Scenario = Literal["authorize", "full-flow", "mixed"]
SCENARIOS: tuple[Scenario, ...] = ("authorize", "full-flow", "mixed")

# Achieved rate must be at least this fraction of the offered one (dropped iterations make it lower).
MIN_RATE_FRACTION = 0.98

_UNITS_S = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|µs|ms|s|m|h)")


def parse_duration(text: str | float, *, default_unit: str = "s", what: str = "duration") -> float:
    """Seconds from ``500ms``, ``0.5s``, ``0.01ms``, ``2m``, ``1m30s`` or a bare number in ``default_unit``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text) * _UNITS_S[default_unit]
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            value = float(s) * _UNITS_S[default_unit]
        except ValueError:
            pos, value = 0, 0.0
            for m in _PART.finditer(s):
                if m.start() != pos:
                    break
                value += float(m.group(1)) * _UNITS_S[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                raise ConfigError(
                    f"{what}: cannot read {text!r}",
                    hint="write a number with a unit: 500ms, 0.5s, 0.01ms, 2m, 1m30s",
                ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what}: {text!r} must be a finite, non-negative time", hint="e.g. 150ms or 2m")
    return value


def parse_latency(text: str | float, what: str = "latency") -> float:
    """Milliseconds from ``150ms``, ``0.5s``, ``0.01ms`` or a bare number of milliseconds."""
    ms = parse_duration(text, default_unit="ms", what=what) * 1000.0
    if ms <= 0:
        raise ConfigError(f"{what}: must be > 0, got {text!r}", hint="e.g. 150ms")
    return ms


def k6_duration(seconds: float) -> str:
    """A duration k6 accepts (whole milliseconds, at least 1 ms)."""
    return f"{max(1, math.ceil(seconds * 1000 - 1e-9))}ms"


@dataclass(frozen=True)
class GateSpec:
    """What one verify run offers and requires."""

    rps: int
    duration_s: float
    warmup_s: float
    p95_ms: float
    p99_ms: float
    max_error_rate: float
    scenario: Scenario = "authorize"
    merchants: int = 100
    mix: dict[str, float] = field(default_factory=lambda: {"authorize": 1.0})
    max_vus: int | None = None
    min_rate_fraction: float = MIN_RATE_FRACTION

    def __post_init__(self) -> None:
        problems = []
        if self.rps <= 0:
            problems.append(f"--rps: must be > 0, got {self.rps}")
        if self.duration_s <= 0:
            problems.append("--duration: must be > 0")
        if self.p99_ms < self.p95_ms:
            problems.append(f"--p99 ({self.p99_ms:g}ms) must be >= --p95 ({self.p95_ms:g}ms)")
        if not 0 <= self.max_error_rate < 1:
            problems.append(f"--max-error-rate: must be in [0, 1), got {self.max_error_rate:g}")
        if self.merchants <= 0:
            problems.append("--merchants: must be > 0")
        if self.scenario not in SCENARIOS:
            problems.append(f"--scenario: must be one of {', '.join(SCENARIOS)}")
        if self.max_vus is not None and self.max_vus <= 0:
            problems.append("--max-vus: must be > 0")
        if problems:
            raise ConfigError("invalid gate", hint="fix the options listed above", problems=problems)


def spec_from_phase(phase: Phase | None, **overrides: Any) -> GateSpec:
    """The phase's gate with the given (non-None) overrides; without a phase every core value must be given."""
    base: dict[str, Any] = {}
    if phase is not None:
        g = phase.gate
        base = {
            "rps": g.rps,
            "duration_s": float(g.duration_s),
            "warmup_s": float(g.warmup_s),
            "p95_ms": g.p95_ms,
            "p99_ms": g.p99_ms,
            "max_error_rate": g.max_error_rate,
            "merchants": g.merchants,
            "mix": dict(g.mix),
            "scenario": "mixed",
        }
    base.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("rps", "duration_s", "warmup_s", "p95_ms", "p99_ms", "max_error_rate") if k not in base]
    if missing:
        raise ConfigError(
            f"no phase to take the gate from and missing: {', '.join(missing)}",
            hint="pass --phase N, or every one of --rps --duration --warmup --p95 --p99 --max-error-rate",
        )
    return GateSpec(**base)


def deployed_phase(deployment: str, home: Path | None = None) -> int | None:
    """The phase deployed now, from the local audit log (``payctl.audit``): the last apply that ended ``ok`` or
    ``gate-failed`` (a failed gate leaves the deployment as applied); None when nothing is deployed or a later
    ``down`` stopped it."""
    path = (home or payctl_home()) / deployment / "audit.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "down" in str(rec.get("command", "")).split() and rec.get("result") == "ok":
            return None
        phase = rec.get("phase")
        if isinstance(phase, int) and rec.get("result") in ("ok", "gate-failed"):
            return phase
    return None


# ------------------------------------------------------------------------------------------------------ safety


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    loopback: bool
    warnings: tuple[str, ...] = ()


def _is_local_address(addr: str) -> bool:
    """True when this machine holds ``addr`` (binding to it succeeds); contacts nothing."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def inventory_addresses(inv: Inventory) -> dict[str, str]:
    """Every address of the inventory, mapped to the node that holds it."""
    out: dict[str, str] = {}
    for n in inv.nodes:
        for a in (n.public_address, n.private_address):
            if a:
                out[str(ipaddress.ip_address(a))] = n.name
    return out


def lb_url(inv: Inventory) -> str:
    """The inventory's load-balancer address (the node with role lb), as the URL verify targets by default."""
    lbs = inv.with_role("lb")
    if not lbs:
        raise ConfigError("the inventory has no node with the role 'lb'", hint="pass --url, or add the lb role")
    addr = lbs[0].address
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}"


def check_target(url: str, inv: Inventory | None) -> Target:
    """Refuse any target that is neither loopback nor an address of the inventory (before anything is contacted)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"target URL {url!r} is not an http(s) URL with a host", hint="e.g. http://10.77.0.11")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"target URL {url!r} has an invalid port", hint="e.g. http://127.0.0.1:8080") from None
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"refusing to send load to {host!r}: only IP addresses are accepted (a name could resolve anywhere)",
            hint="use the node's address from the inventory, or 127.0.0.1",
        ) from None
    known = inventory_addresses(inv) if inv is not None else {}
    if not addr.is_loopback and str(addr) not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigError(
            f"refusing to send load to {addr}: it is not loopback and not an address of the inventory",
            hint=f"verify only targets loopback or the inventory's nodes ({listed})",
        )
    warnings = []
    if inv is not None:
        local = sorted(f"{name} ({a})" for a, name in known.items() if _is_local_address(a))
        if local:
            warnings.append(
                f"the load generator runs on a node under test ({', '.join(local)}): k6 competes with the service "
                "for CPU, so the measured capacity is lower than the node's"
            )
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return Target(url=base, host=str(addr), port=port, loopback=addr.is_loopback, warnings=tuple(warnings))


# ------------------------------------------------------------------------------------------------------ verdict


@dataclass(frozen=True)
class K6Summary:
    """The measured window (scenario ``measure``) from k6's end-of-test summary."""

    duration_s: float
    offered_rps: int
    iterations: int
    requests: int
    dropped: int
    failed_requests: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    avg_ms: float | None
    max_ms: float | None
    functional_passes: int
    functional_fails: int
    status_fails: int

    @property
    def achieved_rps(self) -> float:
        return self.iterations / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @classmethod
    def from_k6(cls, data: dict[str, Any], *, duration_s: float, offered_rps: int) -> K6Summary:
        """Read k6's handleSummary/--summary-export data (the sub-metrics tagged ``scenario:measure``)."""
        metrics = data.get("metrics", {})

        def values(name: str, tags: str = "scenario:measure") -> dict[str, Any]:
            m = metrics.get(f"{name}{{{tags}}}")
            if not isinstance(m, dict):
                return {}
            v = m.get("values", m)  # handleSummary nests values; --summary-export does not
            return v if isinstance(v, dict) else {}

        def num(d: dict[str, Any], key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, int | float) else None

        dur = values("http_req_duration")
        failed = values("http_req_failed")
        func = values("checks", "scenario:measure,kind:functional")
        stat = values("checks", "scenario:measure,kind:status")
        requests = int(num(values("http_reqs"), "count") or 0)
        # http_req_failed is a rate: "passes" counts the failed requests (value 1), "fails" the good ones.
        failed_n = int(num(failed, "passes") or 0)
        return cls(
            duration_s=duration_s,
            offered_rps=offered_rps,
            iterations=int(num(values("iterations"), "count") or 0),
            requests=requests,
            dropped=int(num(values("dropped_iterations"), "count") or 0),
            failed_requests=failed_n,
            error_rate=(num(failed, "rate") or 0.0) if requests else 0.0,
            p50_ms=num(dur, "p(50)") if num(dur, "p(50)") is not None else num(dur, "med"),
            p95_ms=num(dur, "p(95)"),
            p99_ms=num(dur, "p(99)"),
            avg_ms=num(dur, "avg"),
            max_ms=num(dur, "max"),
            functional_passes=int(num(func, "passes") or 0),
            functional_fails=int(num(func, "fails") or 0),
            status_fails=int(num(stat, "fails") or 0),
        )


@dataclass(frozen=True)
class Criterion:
    """One rule of the verdict: what was measured against what was required."""

    name: str
    passed: bool
    measured: str
    limit: str
    skipped: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "skipped": self.skipped,
            "measured": self.measured,
            "limit": self.limit,
            "detail": self.detail,
        }


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}ms" if v < 10 else f"{v:.1f}ms"


def judge(s: K6Summary, spec: GateSpec) -> list[Criterion]:
    """One criterion per client-side rule of the gate, each with the measured value and the limit."""
    need = spec.min_rate_fraction * spec.rps
    out = [
        Criterion(
            "achieved rate",
            s.achieved_rps >= need and s.iterations > 0,
            f"{s.achieved_rps:.1f}/s ({s.iterations} iterations in {s.duration_s:g}s, {s.dropped} dropped)",
            f">= {need:.1f}/s ({spec.min_rate_fraction:.0%} of {spec.rps})",
        ),
        Criterion(
            "p95 latency",
            s.p95_ms is not None and s.p95_ms <= spec.p95_ms,
            _ms(s.p95_ms),
            f"<= {_ms(spec.p95_ms)}",
        ),
        Criterion(
            "p99 latency",
            s.p99_ms is not None and s.p99_ms <= spec.p99_ms,
            _ms(s.p99_ms),
            f"<= {_ms(spec.p99_ms)}",
        ),
        Criterion(
            "error rate",
            s.requests > 0 and (s.error_rate < spec.max_error_rate or s.failed_requests == 0),
            f"{s.error_rate:.2%} ({s.failed_requests} of {s.requests} requests)",
            f"< {spec.max_error_rate:.2%}" if spec.max_error_rate > 0 else "no failed request",
        ),
        Criterion(
            "functional checks",
            s.functional_fails == 0 and s.functional_passes > 0,
            f"{s.functional_fails} failed of {s.functional_passes + s.functional_fails}",
            "all pass",
        ),
    ]
    return out


def passed(criteria: list[Criterion]) -> bool:
    return all(c.passed or c.skipped for c in criteria)
