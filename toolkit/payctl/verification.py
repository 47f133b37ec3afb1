"""One gate run as a library call: what ``payctl verify`` does, for the deploy engine's ``phaseN apply`` too.

    run = gate_run(inv, phase, spec, target, checks=payapp_checks(ssh_runner))   # or verify_phase(...) below
    path = write_report(run)            # payctl.report
    run.exit_code                        # 0 pass, 1 gate failed; TargetUnreachable (exit 3) is raised instead

``verify_phase(inv, phase)`` is the short form for an apply: the phase's own gate against the inventory's LB, the
report written under ``reports/``. Nothing here prints; progress goes to ``on_progress`` (about once a second).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from payctl.gate import GateSpec, Target, check_target, judge, lb_url, spec_from_phase
from payctl.inventory import Inventory
from payctl.loadrun import run_load
from payctl.phase import Phase
from payctl.report import ServerSeries, VerifyRun, write_report
from payctl.serverchecks import ServerCheck, run_server_checks
from payctl.timeseries import Live


class Sampler(Protocol):
    """Server-side series sampled during the load (seconds since the start of the run)."""

    def sample(self, t: float) -> None: ...

    def series(self) -> ServerSeries: ...


def gate_run(
    deployment: str,
    phase: Phase | None,
    spec: GateSpec,
    target: Target,
    *,
    checks: Sequence[ServerCheck] = (),
    on_progress: Callable[[Live], None] | None = None,
    sampler: Sampler | None = None,
) -> VerifyRun:
    """Load ``target`` as ``spec`` says, then run the server-side ``checks`` that apply to ``phase``.

    ``sampler`` (e.g. ``labmetrics.LabSampler``) is called about once a second during the load and its series go
    into the report's server sections."""

    def progress(live: Live) -> None:
        if sampler is not None:
            sampler.sample(live.elapsed_s)
        if on_progress is not None:
            on_progress(live)

    result = run_load(spec, target, on_progress=progress)
    criteria = judge(result.summary, spec) + run_server_checks(checks, phase)
    return VerifyRun(
        deployment=deployment,
        phase=phase.number if phase else None,
        target=target.url,
        spec=spec,
        result=result,
        criteria=criteria,
        warnings=target.warnings,
        server=sampler.series() if sampler is not None else ServerSeries(),
    )


def verify_phase(
    inv: Inventory,
    phase: Phase,
    *,
    checks: Sequence[ServerCheck] = (),
    on_progress: Callable[[Live], None] | None = None,
    sampler: Sampler | None = None,
    report_base: Path = Path("reports"),
) -> tuple[VerifyRun, Path]:
    """The phase's gate against the inventory's load balancer; returns the run and its report directory."""
    target = check_target(lb_url(inv), inv)
    spec = spec_from_phase(phase)
    run = gate_run(inv.deployment, phase, spec, target, checks=checks, on_progress=on_progress, sampler=sampler)
    return run, write_report(run, base=report_base)
