"""`payctl drill -i INV SCENARIO [--rps R] [--duration D] [--report-dir DIR] [--dry-run] [--yes]`: a fault drill.

Shows what it will do, asks (or exits 2 without a terminal and --yes), runs the load, the fault, the recovery and the
audit (``payctl.drill``), prints the results table and writes it (results.json, results.md, the k6 log) into the
report folder. Exit codes: 0 nothing lost or duplicated and recovered within the bound, 1 the drill failed (each
reason printed), 2 usage or a refused inventory, 3 the load could not run.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from payctl import drill
from payctl.errors import ConfigError
from payctl.gate import parse_duration
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def drill_cmd(
    scenario: str = typer.Argument(..., help=f"One of: {', '.join(drill.built())}."),
    inventory: str = typer.Option(..., "-i", "--inventory", help="A lab inventory (lab-1node, lab-2node)."),
    rps: int = typer.Option(15, "--rps", help="Payment flows per second (each: authorize, 60% capture, refunds)."),
    duration: str = typer.Option(None, "--duration", help="Whole load, e.g. 30s, 2m (default 30s; disk-full 100s)."),
    warmup: str = typer.Option("8s", "--warmup", help="Load before the fault."),
    fault_duration: str = typer.Option(
        "8s", "--fault-duration", help="partition: how long the link stays down; disk-full: the disk stays full."
    ),
    recover_bound: str = typer.Option(
        None, "--recover-bound", help="The fault's start to recovered, at most (default 60s; disk-full 100s)."
    ),
    node: str = typer.Option(None, "--node", help="The node to fault (default: where the program runs)."),
    report_dir: Annotated[Path | None, typer.Option("--report-dir", help="Instead of reports/<...>-drill-X/.")] = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what the drill would do; do nothing."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before faulting the deployment."),
) -> None:
    """Run one fault drill on a lab deployment under constant payment load, then audit every payment.

    Examples:

      payctl drill -i lab-1node kill-app --yes

      payctl drill -i lab-1node partition --rps 20 --duration 60s --fault-duration 10s --yes

      payctl drill -i lab-1node disk-full --rps 15 --fault-duration 10s --yes
    """
    known = drill.SCENARIOS.get(scenario)
    spec = drill.DrillSpec(
        scenario=scenario,
        rps=rps,
        duration_s=parse_duration(duration, what="--duration") if duration else known.duration_s if known else 30.0,
        warmup_s=parse_duration(warmup, what="--warmup"),
        fault_s=parse_duration(fault_duration, what="--fault-duration"),
        recover_bound_s=(
            parse_duration(recover_bound, what="--recover-bound") if recover_bound
            else known.recover_bound_s if known else 60.0
        ),
        node=node,
    )
    inv = load_inventory(inventory)
    plan = drill.plan_drill(inv, spec, home=payctl_home().absolute(), inventory_path=resolve_inventory_path(inventory))
    out.print(plan.describe(), markup=False)
    if dry_run:
        out.print("dry run: nothing done", markup=False)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("payctl drill faults the deployment and asks first, but stdin is not a terminal",
                              hint="add --yes to go ahead without asking")  # fmt: skip
        if not typer.confirm("Run this drill?", default=False):
            out.print("nothing done (aborted)")
            raise typer.Exit(1)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    directory = report_dir or Path("reports") / f"{stamp}-{inv.deployment}-drill-{scenario}"
    result = drill.run_drill(plan, directory, on_step=lambda s: err.print(f"  {s}", markup=False),
                             command=f"drill {scenario}", audit_home=payctl_home().absolute(),
                             inventory_path=resolve_inventory_path(inventory))  # fmt: skip
    drill.write_results([result], directory)
    out.print(drill.markdown_table([result]), markup=False)
    for p in result.problems:
        err.print(f"drill failed: {p}", markup=False)
    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    out.print(f"drill {scenario} {verdict}: results in {directory}")
    raise typer.Exit(0 if result.passed else 1)


def register(app: typer.Typer) -> None:
    app.command("drill")(drill_cmd)
