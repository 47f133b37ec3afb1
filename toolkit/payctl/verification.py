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

from payctl.gate import GateSpec, Target, check_target, judge, lb_url, spec_from_phase
from payctl.inventory import Inventory
from payctl.loadrun import run_load
from payctl.phase import Phase
from payctl.report import ServerSeries, VerifyRun, write_report
from payctl.serverchecks import ServerCheck, run_server_checks
from payctl.timeseries import Live


def gate_run(
    deployment: str,
    phase: Phase | None,
    spec: GateSpec,
    target: Target,
    *,
    checks: Sequence[ServerCheck] = (),
    on_progress: Callable[[Live], None] | None = None,
    server: ServerSeries | None = None,
) -> VerifyRun:
    """Load ``target`` as ``spec`` says, then run the server-side ``checks`` that apply to ``phase``."""
    result = run_load(spec, target, on_progress=on_progress)
    criteria = judge(result.summary, spec) + run_server_checks(checks, phase)
    return VerifyRun(
        deployment=deployment,
        phase=phase.number if phase else None,
        target=target.url,
        spec=spec,
        result=result,
        criteria=criteria,
        warnings=target.warnings,
        server=server or ServerSeries(),
    )


def verify_phase(
    inv: Inventory,
    phase: Phase,
    *,
    checks: Sequence[ServerCheck] = (),
    on_progress: Callable[[Live], None] | None = None,
    report_base: Path = Path("reports"),
) -> tuple[VerifyRun, Path]:
    """The phase's gate against the inventory's load balancer; returns the run and its report directory."""
    target = check_target(lb_url(inv), inv)
    run = gate_run(inv.deployment, phase, spec_from_phase(phase), target, checks=checks, on_progress=on_progress)
    return run, write_report(run, base=report_base)
