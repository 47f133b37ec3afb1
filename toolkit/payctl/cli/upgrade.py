"""`payctl upgrade -i INV [--version V] [--dry-run] [--yes]` and `payctl rollback -i INV [--dry-run] [--yes]`.

Prints the node-by-node plan, asks (or exits 2 without a terminal and --yes), shows progress, then per node the
release before and after, the drain time and the time out of the load balancer (or, on one node, the downtime).
The work is done by ``payctl.upgrade``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from payctl import upgrade
from payctl.cli.apply import ConsoleHooks
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name (lab-2node, ktcloud-2node).")


class _Hooks(ConsoleHooks):
    def confirm(self, plan: upgrade.UpgradePlan) -> bool:  # type: ignore[override]
        self.stop()
        for line in upgrade.describe(plan):
            self.console.print(line, markup=False)
        if self.yes:
            return True
        answer = typer.confirm(f"{plan.kind.capitalize()} deployment '{plan.deployment}'?", default=False)
        if not answer:
            self.console.print("nothing changed (aborted)")
        return answer


def _run(kind: upgrade.Kind, inventory: str, version: str | None, dry_run: bool, yes: bool,
         health_timeout: float) -> None:  # fmt: skip
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    if not dry_run and not yes and not sys.stdin.isatty():
        raise ConfigError(f"payctl {kind} changes hosts and asks first, but stdin is not a terminal",
                          hint="add --yes to go ahead without asking, or --dry-run to only see the plan")  # fmt: skip
    argv = ["payctl", kind, "-i", inventory] + (["--version", version] if version else [])
    hooks = _Hooks(console, yes=yes)
    req = upgrade.UpgradeRequest(inv, resolve_inventory_path(inventory), payctl_home().absolute(), " ".join(argv),
                                 kind, version, dry_run, health_timeout)  # fmt: skip
    try:
        result = upgrade.run(req, hooks)
    finally:
        hooks.stop()
    if dry_run:
        for line in upgrade.describe(result.plan):
            console.print(line, markup=False)
        console.print("dry run: nothing changed", markup=False)
        return
    if not result.applied:
        raise typer.Exit(1)
    for o in result.nodes:
        lb = f", out of the LB {o.out_of_lb_s:.1f}s" if o.out_of_lb_s is not None else ""
        down = f", downtime {o.downtime_s:.1f}s (SIGTERM to healthy, no peer to carry traffic)" \
            if o.downtime_s is not None else ""  # fmt: skip
        stage = f"stage {o.stage_s:.1f}s, " if kind == "upgrade" else ""
        console.print(f"{o.node}: {o.before} -> {o.after}, drain {o.drain_s:.1f}s{lb}{down} "
                      f"({stage}start to healthy {o.healthy_s:.1f}s)", markup=False)  # fmt: skip
        for note in o.notes:
            console.print(f"  note: {note}", markup=False)
    done = "upgraded" if kind == "upgrade" else "rolled back"
    console.print(f"{done} {inv.deployment} in {result.duration_s:.1f}s; audit: {result.audit_path}", markup=False)


_VERSION = typer.Option(None, "--version", help="A git ref of this checkout to build payapp from "
                        "(default: the checkout as it is, or $PAYCTL_APP_SOURCE).")
_HEALTH = typer.Option(60.0, "--health-timeout", min=1, help="Seconds a restarted node has to become healthy.")


def upgrade_cmd(
    inventory: str = _INVENTORY,
    version: str = _VERSION,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before changing hosts."),
    health_timeout: float = _HEALTH,
) -> None:
    """Rolling upgrade: a new payapp release on every node, one node at a time, out of the load balancer meanwhile.

    Examples:

      payctl upgrade -i lab-2node --dry-run

      payctl upgrade -i lab-2node --yes

      payctl upgrade -i ktcloud-2node --version v0.2.0
    """
    _run("upgrade", inventory, version, dry_run, yes, health_timeout)


def rollback_cmd(
    inventory: str = _INVENTORY,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before changing hosts."),
    health_timeout: float = _HEALTH,
) -> None:
    """Every node back to the previous payapp release kept on it, one node at a time (same load-balancer dance).

    Example: payctl rollback -i lab-2node --yes
    """
    _run("rollback", inventory, None, dry_run, yes, health_timeout)


def register(app: typer.Typer) -> None:
    app.command("upgrade")(upgrade_cmd)
    app.command("rollback")(rollback_cmd)
