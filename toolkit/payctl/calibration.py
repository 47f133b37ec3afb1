"""Stored calibrations and the capacity they predict: what ``payctl plan`` and ``payctl calibrate`` read.

A ``Calibration`` (``payctl.calibrate``) is kept per deployment, runtime and node count in
``$PAYCTL_HOME/<deployment>/calibration.json``. ``predict_capacity`` turns it into a prediction for a node count and
says when a target is out of reach; ``plan_calibration`` turns it into the plan's own cost model
(``payctl.plan.Calibration.from_measured``), and ``compare_with_plan`` says how far the plan's default prediction was
from the measured knee.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payctl.calibrate import Calibration
from payctl.errors import ConfigError
from payctl.inventory import Inventory
from payctl.paths import payctl_home
from payctl.phase import Phase
from payctl.plan import ACTION_COST, make_plan
from payctl.plan import Calibration as PlanCalibration

# Assumed efficiency of each node added beyond the calibrated count (the network hop, replication, one shared
# rate-limit counter): an extrapolation, so its uncertainty grows with every node. Calibrate on the real node count.
NODE_EFFICIENCY = 0.9
# One full-flow iteration in authorize-equivalents: authorize, its replay, capture, and a refund 30 % of the time.
FULL_FLOW_COST = 3.3


def calibration_path(deployment: str, home: Path | None = None) -> Path:
    return (home or payctl_home()) / deployment / "calibration.json"


def store(cal: Calibration, home: Path | None = None) -> Path:
    """Keep ``cal`` under its runtime and node count, next to the calibrations of other runtimes/sizes."""
    path = calibration_path(cal.deployment, home)
    data = _read(path)
    data.setdefault("runtimes", {}).setdefault(cal.runtime, {})[str(cal.nodes)] = cal.as_dict()
    data["deployment"] = cal.deployment
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path}: not valid JSON", hint="delete it and run payctl calibrate again") from None
    return data if isinstance(data, dict) else {}


def load(deployment: str, runtime: str, home: Path | None = None) -> dict[int, Calibration]:
    """Stored calibrations of a deployment and runtime, by node count."""
    data = _read(calibration_path(deployment, home)).get("runtimes", {}).get(runtime, {})
    return {int(n): Calibration.from_dict(c) for n, c in data.items()}


@dataclass(frozen=True)
class CapacityPrediction:
    predicted_rps: float
    plus_minus: float
    nodes: int
    calibrated_nodes: int
    target_rps: int
    reachable: bool
    message: str


def predict_capacity(
    deployment: str,
    runtime: str,
    nodes: int,
    target_rps: int,
    *,
    phase: int | None = None,
    home: Path | None = None,
) -> CapacityPrediction | None:
    """Capacity of ``nodes`` app nodes from the stored calibration (None when there is none yet).

    The calibrated knee is the measured capacity on the calibrated node count, ± the larger of half a step (the
    search's resolution) and the model's peak standard error scaled to the knee. Other node counts scale linearly
    with NODE_EFFICIENCY per node of difference, and the uncertainty widens by 10 % of the estimate per node.
    """
    cals = {n: c for n, c in load(deployment, runtime, home).items() if c.knee_rps}
    if not cals:
        return None
    base_n = min(cals, key=lambda n: (abs(n - nodes), -n))
    cal = cals[base_n]
    assert cal.knee_rps is not None
    pm = cal.step_rps / 2
    if cal.fit is not None and cal.peak_stderr and math.isfinite(cal.fit.peak_rps) and cal.fit.peak_rps > 0:
        pm = max(pm, cal.peak_stderr * cal.knee_rps / cal.fit.peak_rps)
    diff = abs(nodes - base_n)
    predicted = cal.knee_rps * nodes / base_n * NODE_EFFICIENCY**diff
    pm = pm * nodes / base_n + 0.10 * predicted * diff
    who = f"phase {phase} target" if phase is not None else "target"
    where = f"on {nodes} node{'s' if nodes != 1 else ''}"
    basis = "" if diff == 0 else f" (extrapolated from a calibration on {base_n})"
    reachable = target_rps <= predicted - pm
    head = f"{who} {target_rps} RPS, predicted {predicted:.0f} ± {pm:.0f} {where}{basis}"
    if reachable:
        message = f"{head}: within reach"
    elif target_rps <= predicted + pm:
        message = f"{head}: marginal, re-run payctl verify --find-knee after the next change"
    else:
        message = f"{head}: add a node or raise workers"
    return CapacityPrediction(predicted, pm, nodes, base_n, target_rps, reachable, message)


# ------------------------------------------------------------------------------------------- the plan's model


def mix_factor(scenario: str, phase: Phase | None) -> float:
    """Authorize-equivalents per iteration of ``scenario`` (the plan's ACTION_COST weights for ``mixed``)."""
    if scenario == "full-flow":
        return FULL_FLOW_COST
    if scenario == "mixed" and phase is not None:
        return sum(w * ACTION_COST[a] for a, w in phase.gate.mix.items())
    return 1.0


def app_cpus(inv: Inventory, phase: Phase) -> float:
    """CPUs the plan gives the app tier (every active node's app component)."""
    plan = make_plan(inv, phase, allow_overcommit=True)
    return sum(c.cpus for n in plan.nodes if n.active for c in n.components if c.name == "app")


def plan_calibration(cal: Calibration, inv: Inventory, phase: Phase) -> PlanCalibration | None:
    """The plan's cost model with the app cost measured by ``cal`` (None without a knee)."""
    if not cal.knee_rps:
        return None
    cpus = app_cpus(inv, phase)
    if cpus <= 0:
        return None
    return PlanCalibration.from_measured(
        cal.knee_rps,
        cpus,
        mix_factor(cal.scenario, phase),
        source=f"measured knee {cal.knee_rps}/s ({cal.scenario}) on {cal.nodes} node(s), payctl calibrate",
    )


def plan_calibration_for(inv: Inventory, phase: Phase, home: Path | None = None) -> PlanCalibration | None:
    """What ``payctl plan`` can pass to ``make_plan(calibration=...)``: the stored knee for this node count."""
    nodes = len(inv.with_role("app"))
    cal = load(inv.deployment, inv.runtime, home).get(nodes)
    return plan_calibration(cal, inv, phase) if cal is not None else None


@dataclass(frozen=True)
class PlanComparison:
    planned_rps: int  # the plan's prediction with its default costs
    bottleneck: str
    knee_rps: int
    off_by_pct: float  # (planned - measured) / measured
    calibrated_rps: int | None  # the plan's prediction with the measured app cost

    @property
    def message(self) -> str:
        cal = f"; calibrated, the plan now says {self.calibrated_rps}/s" if self.calibrated_rps is not None else ""
        return (
            f"the plan predicted {self.planned_rps}/s (bottleneck {self.bottleneck}), the measured knee is "
            f"{self.knee_rps}/s: off by {self.off_by_pct:+.0%}{cal}"
        )


def compare_with_plan(cal: Calibration, inv: Inventory, phase: Phase) -> PlanComparison | None:
    """How far the plan's default prediction was from the measured knee (None without a knee)."""
    if not cal.knee_rps:
        return None
    planned = make_plan(inv, phase, allow_overcommit=True).capacity
    pc = plan_calibration(cal, inv, phase)
    calibrated = make_plan(inv, phase, allow_overcommit=True, calibration=pc).capacity.total_rps if pc else None
    return PlanComparison(
        planned_rps=planned.total_rps,
        bottleneck=planned.bottleneck,
        knee_rps=cal.knee_rps,
        off_by_pct=(planned.total_rps - cal.knee_rps) / cal.knee_rps,
        calibrated_rps=calibrated,
    )
