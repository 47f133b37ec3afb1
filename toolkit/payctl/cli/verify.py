"""`payctl verify` (the k6 gate, a report per run, `--find-knee`) and `payctl calibrate` (the stored knee).

Exit codes: 0 gate passed, 1 gate failed (every failed criterion printed, measured vs limit), 2 usage or inventory
error, 3 target unreachable or k6 missing/crashed (no report is written then).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live as RichLive
from rich.table import Table
from rich.text import Text

from payctl.calibrate import Step, calibrate, find_knee, knee_rates
from payctl.calibration import compare_with_plan, predict_capacity, store
from payctl.calibration import load as load_calibrations
from payctl.errors import ConfigError, PayctlError
from payctl.gate import (
    GateSpec,
    Scenario,
    Target,
    check_target,
    deployed_phase,
    lb_url,
    parse_duration,
    parse_latency,
    spec_from_phase,
)
from payctl.hosts import is_lab
from payctl.inventory import Inventory, load_inventory
from payctl.kneereport import write_knee_report
from payctl.lab import detect_cgroups
from payctl.lab import layout as lab_layout
from payctl.labmetrics import LabSampler
from payctl.monitoring import run_sampler
from payctl.paths import payctl_home
from payctl.phase import Phase, load_phase
from payctl.report import VerifyRun, write_report
from payctl.serverchecks import ServerCheck, local_runner, netns_runner, payapp_checks
from payctl.timeseries import Live
from payctl.verification import Sampler, gate_run

_EXAMPLES = """

Examples:

  payctl verify -i lab-1node --phase 1

  payctl verify --url http://127.0.0.1:8080 --rps 50 --duration 5s --warmup 1s --p95 150ms --p99 300ms

  payctl verify -i lab-1node --phase 1 --find-knee --from 100 --to 800 --step-size 100 --duration 10s

Exit codes: 0 pass, 1 gate failed, 2 usage or inventory error, 3 target unreachable or k6 missing/crashed.
"""

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _live_table(live: Live, spec: GateSpec) -> Text:
    total = spec.warmup_s + spec.duration_s
    p95 = f"{live.p95_ms:.1f}ms" if live.p95_ms is not None else "-"
    return Text.assemble(
        (f"{live.stage:<8}", "bold"),
        f" {live.elapsed_s:.0f}/{total:.0f}s | {live.rate:.0f}/s of {spec.rps} | p95 {p95} (<= {spec.p95_ms:g}ms)"
        f" | errors {live.errors}/{live.requests} | dropped {live.dropped}",
    )


def _load_env_file(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--payapp-env {path}: {exc.strerror}", hint="the payapp env file of the target") from None
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip("'\"")
    return env


def _lab_checks(inv: Inventory, bound_s: float) -> list[ServerCheck]:
    """On a lab deployment, run payapp inside the first app node's namespace with its own venv and env file."""
    if not is_lab(inv):
        return []
    try:
        nodes = {n.node: n for n in lab_layout(inv)}
    except PayctlError:
        return []
    app = next((nodes[n.name] for n in inv.with_role("app") if n.name in nodes), None)
    if app is None:
        return []
    payapp, env_file = app.prefix / "venv" / "bin" / "payapp", app.prefix / "app.env"
    if not (payapp.is_file() and env_file.is_file()):
        return []
    cmd = (str(payapp), "--env-file", str(env_file))
    return payapp_checks(netns_runner(app.namespace), payapp=cmd, backlog_bound_s=bound_s)


class _Context:
    """What verify and calibrate resolve from their options before running anything."""

    def __init__(
        self,
        inventory: str | None,
        url: str | None,
        phase_n: int | None,
        overrides: dict[str, object],
    ) -> None:
        self.inv: Inventory | None = load_inventory(inventory) if inventory else None
        if self.inv is None and url is None:
            raise ConfigError("give an inventory (-i INV) or a --url to verify", hint="e.g. payctl verify -i lab-1node")
        # Without --phase: the phase deployed now (the local audit log of applies), else phase 1's gate.
        deployed = deployed_phase(self.inv.deployment) if self.inv is not None and phase_n is None else None
        self.phase_defaulted = phase_n is None and deployed is None and self.inv is not None
        number = phase_n if phase_n is not None else deployed or (1 if self.inv is not None else None)
        self.phase: Phase | None = load_phase(number) if number is not None else None
        self.spec: GateSpec = spec_from_phase(self.phase, **overrides)
        self.target: Target = check_target(url if url is not None else lb_url(self.inv) if self.inv else "", self.inv)
        self.deployment = self.inv.deployment if self.inv else "local"

    def warn(self) -> None:
        if self.phase_defaulted:
            err.print("note: no --phase given and no apply recorded for this deployment: using the gate of phase 1")
        for w in self.target.warnings:
            err.print(f"[yellow]warning:[/] {w}")


def _lab_sampler(inv: Inventory | None) -> LabSampler | None:
    """Per-node CPU and memory from the lab's cgroups, when the target is a lab deployment on this machine."""
    if inv is None or not is_lab(inv):
        return None
    try:
        return LabSampler(lab_layout(inv), detect_cgroups())
    except PayctlError:
        return None


def _run_gate(ctx: _Context, spec: GateSpec, checks: list[ServerCheck], quiet: bool) -> VerifyRun:
    local = _lab_sampler(ctx.inv) if not ctx.target.loopback else None
    if ctx.inv is None or ctx.target.loopback:
        return _gate(ctx, spec, checks, quiet, local)
    # The deployment's Prometheus (phase 4+) adds consumer lag, and CPU/memory where the lab's cgroups give none.
    with run_sampler(ctx.inv, payctl_home().absolute(), local) as sampler:
        return _gate(ctx, spec, checks, quiet, sampler)


def _gate(ctx: _Context, spec: GateSpec, checks: list[ServerCheck], quiet: bool, sampler: Sampler | None) -> VerifyRun:
    if quiet:
        return gate_run(ctx.deployment, ctx.phase, spec, ctx.target, checks=checks, sampler=sampler)
    with RichLive(_live_table(Live(0, "starting", 0, None, 0, 0, 0), spec), console=err, transient=True) as live:
        return gate_run(
            ctx.deployment, ctx.phase, spec, ctx.target, checks=checks, sampler=sampler,
            on_progress=lambda s: live.update(_live_table(s, spec)),
        )  # fmt: skip


def _print_verdict(run: VerifyRun, report: Path) -> None:
    table = Table(title_justify="left")
    for col in ("criterion", "result", "measured", "limit"):
        table.add_column(col)
    for c in run.criteria:
        res = "[dim]skipped[/]" if c.skipped else "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, res, c.measured, c.limit + (f" ({c.detail})" if c.detail else ""))
    out.print(table)
    verdict = "[bold green]PASS[/]" if run.passed else "[bold red]FAIL[/]"
    out.print(f"gate {verdict}: report in {report}")
    _print_failures(run)


def _print_failures(run: VerifyRun) -> None:
    for c in run.criteria:
        if not (c.passed or c.skipped):
            err.print(f"gate failed: {c.name}: measured {c.measured}, limit {c.limit}", markup=False)


def _knee(
    ctx: _Context,
    checks: list[ServerCheck],
    start: int | None,
    stop: int | None,
    step: int | None,
    report_dir: Path | None,
    quiet: bool,
    cooldown_s: float,
) -> int:
    target_rps = ctx.spec.rps
    step = step or max(1, target_rps // 5)
    start = start or step
    stop = stop or max(start, 2 * target_rps)
    rates = knee_rates(start, stop, step)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    phase = f"phase{ctx.phase.number}" if ctx.phase else "nophase"
    base = report_dir or Path("reports") / f"{stamp}-{ctx.deployment}-{phase}-knee"

    def one(rate: int) -> Step:
        spec = dataclasses.replace(ctx.spec, rps=rate)
        run = _run_gate(ctx, spec, checks, quiet)
        s = run.result.summary
        write_report(run, directory=base / f"step-{rate}rps")
        return Step(
            offered_rps=rate,
            achieved_rps=s.achieved_rps,
            mean_ms=s.avg_ms or 0.0,
            p95_ms=s.p95_ms,
            p99_ms=s.p99_ms,
            error_rate=s.error_rate,
            dropped=s.dropped,
            passed=run.passed,
            failed=tuple(c.name for c in run.criteria if not (c.passed or c.skipped)),
        )

    def show(s: Step) -> None:
        verdict = "pass" if s.passed else f"FAIL ({', '.join(s.failed)})"
        p95 = f"{s.p95_ms:.1f}" if s.p95_ms is not None else "-"
        out.print(f"  {s.offered_rps:6d}/s -> {s.achieved_rps:8.1f}/s  p95 {p95} ms  dropped {s.dropped}  {verdict}")

    out.print(f"knee search: {', '.join(map(str, rates))} /s, {ctx.spec.duration_s:g}s each")
    knee = find_knee(rates, one, show, between=lambda: time.sleep(cooldown_s))
    nodes = len(ctx.inv.with_role("app")) if ctx.inv else 1
    runtime = ctx.inv.runtime if ctx.inv else "local"
    calib = calibrate(knee, deployment=ctx.deployment, runtime=runtime, nodes=nodes, scenario=ctx.spec.scenario)
    notes: list[str] = []
    if ctx.inv is not None and ctx.phase is not None and not ctx.target.loopback:
        cmp = compare_with_plan(calib, ctx.inv, ctx.phase)
        if cmp is not None:
            notes.append(cmp.message)
    write_knee_report(calib, base, p95_limit_ms=ctx.spec.p95_ms, notes=notes)
    if knee.knee_rps is None:
        out.print(f"[bold red]no knee:[/] the first step ({rates[0]}/s) already fails the gate")
    else:
        out.print(f"[bold]knee: {knee.knee_rps}/s[/] (highest passing rate, resolution {knee.step_rps}/s)")
    if calib.fit is not None:
        f = calib.fit
        peak = f"{f.peak_rps:.0f}/s" if f.peak_rps != float("inf") else "not reached"
        out.print(
            f"model: {f.model} lambda={f.lam:.1f} sigma={f.sigma:.4f} kappa={f.kappa:.6f} "
            f"(rmse {f.rmse:.1f}/s), ceiling {peak}"
        )
    for note in notes:
        out.print(note)
    if ctx.inv is not None and not ctx.target.loopback:
        out.print(f"calibration stored in {store(calib)}")
    else:
        out.print("calibration not stored: a --url on loopback is not the inventory's deployment")
    out.print(f"report in {base}")
    return 0 if knee.knee_rps is not None else 1


def register(app: typer.Typer) -> None:
    @app.command(epilog=_EXAMPLES)
    def verify(
        inventory: str = typer.Option(None, "-i", "--inventory", help="Inventory file or bundled name."),
        rps: int = typer.Option(None, "--rps", help="Offered rate (iterations/s); default from the phase gate."),
        duration: str = typer.Option(None, "--duration", help="Measured time, e.g. 2m, 30s."),
        warmup: str = typer.Option(None, "--warmup", help="Warm-up before the measurement (excluded), e.g. 20s."),
        p95: str = typer.Option(None, "--p95", help="p95 bound, e.g. 150ms, 0.5s."),
        p99: str = typer.Option(None, "--p99", help="p99 bound, e.g. 300ms."),
        max_error_rate: float = typer.Option(None, "--max-error-rate", help="Allowed fraction of failed requests."),
        scenario: str = typer.Option(None, "--scenario", help="authorize | full-flow | mixed (phase: mixed)."),
        merchants: int = typer.Option(None, "--merchants", help="Merchants the load is spread over."),
        url: str = typer.Option(None, "--url", help="Target instead of the inventory's LB (loopback or inventory)."),
        phase: int = typer.Option(None, "--phase", help="Phase whose gate gives the defaults (default 1)."),
        report_dir: Annotated[
            Path | None, typer.Option("--report-dir", help="Report directory instead of reports/<...>/.")
        ] = None,
        max_vus: int = typer.Option(None, "--max-vus", help="Cap k6's VU pool (k6 drops iterations beyond it)."),
        payapp_env: Annotated[
            Path | None, typer.Option("--payapp-env", help="Run the server-side checks here: `payapp` with this env.")
        ] = None,
        backlog_bound: str = typer.Option("60s", "--backlog-bound", help="Time the event backlog has to drain."),
        find_knee: bool = typer.Option(False, "--find-knee", help="Step the rate until the gate fails."),
        start: int = typer.Option(None, "--from", help="Knee search: first rate (default: step size)."),
        stop: int = typer.Option(None, "--to", help="Knee search: last rate (default: 2x the gate's rate)."),
        step_size: int = typer.Option(None, "--step-size", help="Knee search: rate increment (default rps/5)."),
        cooldown: str = typer.Option("5s", "--cooldown", help="Knee search: pause between steps."),
        quiet: bool = typer.Option(False, "--quiet", help="No live display."),
        as_json: bool = typer.Option(False, "--json", help="Print only summary.json on stdout."),
    ) -> None:
        """Run the phase's k6 gate against the deployment and write a report with plots."""
        if scenario is not None and scenario not in ("authorize", "full-flow", "mixed"):
            raise ConfigError(f"--scenario: unknown {scenario!r}", hint="authorize, full-flow or mixed")
        sc: Scenario | None = scenario  # type: ignore[assignment]
        if find_knee and rps is None and inventory is None and phase is None:
            rps = stop or start  # a bare --url knee search has no gate rate: the range stands in for it
        overrides: dict[str, object] = {
            "rps": rps,
            "duration_s": parse_duration(duration, what="--duration") if duration is not None else None,
            "warmup_s": parse_duration(warmup, what="--warmup") if warmup is not None else None,
            "p95_ms": parse_latency(p95, "--p95") if p95 is not None else None,
            "p99_ms": parse_latency(p99, "--p99") if p99 is not None else None,
            "max_error_rate": max_error_rate,
            "scenario": sc,
            "merchants": merchants,
            "max_vus": max_vus,
        }
        if inventory is None and phase is None:
            # A bare --url run has no phase gate: these defaults stand in for it (rps and p95 must be given).
            p95_ms = overrides["p95_ms"]
            defaults = {"duration_s": 30.0, "warmup_s": 0.0, "max_error_rate": 0.01, "merchants": 100}
            if isinstance(p95_ms, float):
                defaults["p99_ms"] = 2 * p95_ms
            overrides = {k: (defaults.get(k) if v is None else v) for k, v in {**defaults, **overrides}.items()}
        ctx = _Context(inventory, url, phase, {k: v for k, v in overrides.items() if v is not None})
        ctx.warn()
        checks: list[ServerCheck] = []
        bound = parse_duration(backlog_bound, what="--backlog-bound")
        if payapp_env is not None:
            checks = payapp_checks(local_runner(_load_env_file(payapp_env)), backlog_bound_s=bound)
        elif ctx.inv is not None and not ctx.target.loopback:
            checks = _lab_checks(ctx.inv, bound)
        if find_knee:
            pause = parse_duration(cooldown, what="--cooldown")
            raise typer.Exit(_knee(ctx, checks, start, stop, step_size, report_dir, quiet or as_json, pause))
        if ctx.phase is not None and not checks:
            err.print("note: server-side checks (backlog, reconciliation) skipped: no runner (--payapp-env FILE)")
        run = _run_gate(ctx, ctx.spec, checks, quiet or as_json)
        path = write_report(run, directory=report_dir)
        if as_json:
            typer.echo((path / "summary.json").read_text(), nl=False)
            _print_failures(run)
        else:
            _print_verdict(run, path)
        raise typer.Exit(run.exit_code)

    @app.command(epilog=_EXAMPLES)
    def calibrate(
        inventory: str = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name."),
        phase: int = typer.Option(None, "--phase", help="Phase whose target the prediction is judged against."),
        nodes: int = typer.Option(None, "--nodes", help="App nodes to predict for (default: the inventory's)."),
        as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
    ) -> None:
        """Show the stored calibration (from `verify --find-knee`), the plan's error and the capacity it predicts."""
        inv = load_inventory(inventory)
        ph = load_phase(phase) if phase is not None else None
        n = nodes or len(inv.with_role("app"))
        target = ph.gate.rps if ph is not None else inv.target_rps
        stored = load_calibrations(inv.deployment, inv.runtime)
        pred = predict_capacity(inv.deployment, inv.runtime, n, target, phase=phase)
        cmp = compare_with_plan(stored[n], inv, ph or load_phase(1)) if n in stored else None
        if as_json:
            doc = {
                "calibrations": {str(k): v.as_dict() for k, v in stored.items()},
                "prediction": dataclasses.asdict(pred) if pred else None,
                "plan": {**dataclasses.asdict(cmp), "message": cmp.message} if cmp else None,
            }
            typer.echo(json.dumps(doc, indent=2))
            return
        if not stored:
            raise ConfigError(
                f"no calibration for deployment {inv.deployment} ({inv.runtime})",
                hint=f"run payctl verify -i {inventory} --find-knee first",
            )
        for k, c in sorted(stored.items()):
            when = datetime.fromtimestamp(c.measured_at, UTC)
            out.print(
                f"{k} node(s): knee {c.knee_rps}/s ({c.scenario}, {len(c.steps)} steps, {when:%Y-%m-%d %H:%M} UTC)"
            )
        if cmp is not None:
            out.print(cmp.message)
        if pred is not None:
            out.print(pred.message)
