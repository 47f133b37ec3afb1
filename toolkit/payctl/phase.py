"""Phases: the scaling plan's five steps as data (``phases/phase1.yml`` ... ``phase5.yml``), cumulative.

(This module is ``payctl.phase``: the name ``payctl.phases`` belongs to the data package holding the YAML files.)

``load_phase(n)`` reads phase files 1..n and returns a frozen ``Phase`` whose ``features`` and ``checks`` include
those of every earlier phase; the gate (target RPS, latency, errors, duration, scenario mix, merchants) and the rate
limits are the ones phase n declares (a phase file may omit ``rate_limits`` to keep the previous phase's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from payctl.errors import ConfigError
from payctl.inventory import RateLimits, load_yaml, validation_problems
from payctl.paths import data_dir

Feature = Literal[
    # phase 1: the single-node stack behind nginx
    "nginx_lb",
    "resource_limits",
    "worker_pool_sizing",
    "rate_limits",
    "migrations",
    "binlog_gtid",
    "outbox_relay",
    # phase 2
    "settlement",
    "reconciliation",
    "capture_backfill",
    # phase 3
    "producer_batching",
    "pool_timeouts",
    "index_checks",
    # phase 4
    "monitoring",
    "grafana",
    "health_checked_deploy",
    # phase 5
    "second_node",
    "witness",
    "kafka_rf2",
    "redis_replica_sentinel",
    "mariadb_replica",
]

Check = Literal[
    "ledger_balanced",
    "no_lost_payments",
    "idempotent_replay",
    "reconciliation_balanced",
    "settlement_complete",
    "outbox_drained",
    "indexes_used",
    "metrics_scraped",
    "replica_consistent",
    "lb_serves_both_nodes",
]

Action = Literal["authorize", "capture", "refund", "void", "get"]

PHASES = (1, 2, 3, 4, 5)

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Gate(BaseModel):
    """What a phase must prove under load before it counts as done."""

    model_config = _FROZEN

    rps: int = Field(..., gt=0, description="Constant arrival rate of the gate's load.")
    p95_ms: float = Field(..., gt=0, description="95th percentile latency bound.")
    p99_ms: float = Field(..., gt=0, description="99th percentile latency bound.")
    max_error_rate: float = Field(..., ge=0, lt=1, description="Fraction of failed requests allowed (strictly below).")
    duration_s: int = Field(..., gt=0, description="Measured duration.")
    warmup_s: int = Field(default=0, ge=0, description="Ramp before the measurement.")
    merchants: int = Field(..., gt=0, description="Merchants the load is spread over.")
    mix: dict[Action, float] = Field(..., description="Scenario weights, summing to 1.")
    checks: tuple[Check, ...] = Field(default=(), description="Functional checks run after the load.")

    @model_validator(mode="after")
    def _mix_sums_to_one(self) -> Gate:
        total = sum(self.mix.values())
        if abs(total - 1.0) > 1e-6 or any(w < 0 for w in self.mix.values()):
            raise ValueError(f"mix weights must be >= 0 and sum to 1 (they sum to {total:g})")
        if self.p99_ms < self.p95_ms:
            raise ValueError("p99_ms must be >= p95_ms")
        return self


class Requires(BaseModel):
    """What the inventory must offer for this phase."""

    model_config = _FROZEN

    min_app_nodes: int = Field(default=1, ge=1)
    nodes: tuple[str, ...] = Field(default=(), description="Node names that must be in the inventory.")


class Producer(BaseModel):
    """Kafka producer batching for the app's outbox relay (the team's phase 3: 16 KB batches, 10 ms linger, lz4)."""

    model_config = _FROZEN

    batch_bytes: int = Field(..., ge=1024, le=16 * 1024 * 1024, description="Producer batch.size in bytes.")
    linger_ms: int = Field(..., ge=0, le=10_000, description="How long the producer waits to fill a batch.")
    compression: Literal["lz4", "gzip", "snappy", "zstd", "none"] = Field(..., description="Batch compression codec.")


class PhaseFile(BaseModel):
    """One phase file as written (only what this phase adds)."""

    model_config = _FROZEN

    phase: int = Field(..., ge=1, le=5)
    title: str
    features: tuple[Feature, ...]
    requires: Requires = Field(default=Requires())
    rate_limits: RateLimits | None = None
    producer: Producer | None = Field(default=None, description="Producer batching (phase 3 on).")
    gate: Gate


class Phase(BaseModel):
    """A phase with everything of the phases before it (what ``load_phase`` returns)."""

    model_config = _FROZEN

    number: int
    title: str
    features: tuple[Feature, ...]
    new_features: tuple[Feature, ...]
    requires: Requires
    rate_limits: RateLimits
    producer: Producer | None
    gate: Gate

    def has(self, feature: Feature) -> bool:
        return feature in self.features


def _read(path: Path) -> PhaseFile:
    try:
        data = load_yaml(path.read_text())
    except OSError:
        raise ConfigError(f"phase file missing: {path}", hint="reinstall payctl or restore phases/") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: YAML syntax error{where}", hint="fix the phase file") from None
    try:
        return PhaseFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"{path}: invalid phase file", hint="fix the keys listed above", problems=validation_problems(exc)
        ) from None


def load_phase(number: int, directory: Path | None = None) -> Phase:
    """Phase ``number`` (1-5) with the features and checks of every earlier phase."""
    if number not in PHASES:
        raise ConfigError(f"no phase {number}", hint="phases are 1, 2, 3, 4 and 5")
    folder = directory or data_dir("phases")
    features: list[Feature] = []
    checks: list[Check] = []
    rate_limits: RateLimits | None = None
    producer: Producer | None = None
    last: PhaseFile | None = None
    for n in range(1, number + 1):
        pf = _read(folder / f"phase{n}.yml")
        if pf.phase != n:
            raise ConfigError(f"{folder / f'phase{n}.yml'}: says phase {pf.phase}", hint="fix its 'phase' key")
        features += [f for f in pf.features if f not in features]
        checks += [c for c in pf.gate.checks if c not in checks]
        rate_limits = pf.rate_limits or rate_limits
        producer = pf.producer or producer
        last = pf
    assert last is not None
    if rate_limits is None:
        raise ConfigError(f"{folder / 'phase1.yml'}: rate_limits missing", hint="phase 1 must declare rate_limits")
    if "producer_batching" in features and producer is None:
        raise ConfigError(
            f"{folder / f'phase{number}.yml'}: feature producer_batching without a 'producer' block",
            hint="add producer: {batch_bytes: 16384, linger_ms: 10, compression: lz4} to the phase that turns it on",
        )
    return Phase(
        number=number,
        title=last.title,
        features=tuple(features),
        new_features=last.features,
        requires=last.requires,
        rate_limits=rate_limits,
        producer=producer,
        gate=last.gate.model_copy(update={"checks": tuple(checks)}),
    )
