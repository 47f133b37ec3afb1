"""`payctl scale add-node -i INV --node NAME [--dry-run] [--yes]`: add a node to a running deployment.

Prints the ordered steps (each with its undo), asks (or exits 2 without a terminal and --yes), shows progress, and
the replica's GTID and semi-sync state at the end. The work is done by ``payctl.scale``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from payctl import scale
from payctl.cli.apply import ConsoleHooks
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_INVENTORY = typer.Option(..., "-i", "--inventory", help="The inventory with the new node (lab-2node, ktcloud-2node).")


class _Hooks(ConsoleHooks):
    def confirm(self, plan: scale.AddNodePlan) -> bool:  # type: ignore[override]
        self.stop()
        for line in scale.describe(plan):
            self.console.print(line, markup=False)
        if self.yes:
            return True
        answer = typer.confirm(f"Add {plan.node} to deployment '{plan.deployment}'?", default=False)
        if not answer:
            self.console.print("nothing changed (aborted)")
        return answer


def add_node_cmd(
    inventory: str = _INVENTORY,
    node: str = typer.Option(..., "--node", help="The node to add (declared in the inventory, not running yet)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the steps; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before changing hosts."),
) -> None:
    """Add a node to a running deployment without stopping traffic: MariaDB replica seeded online, its app, the LB.

    Examples:

      payctl scale add-node -i lab-2node --node node2 --dry-run

      payctl scale add-node -i ktcloud-2node --node node2 --yes
    """
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    if not dry_run and not yes and not sys.stdin.isatty():
        raise ConfigError(
            "payctl scale add-node changes hosts and asks first, but stdin is not a terminal",
            hint="add --yes to apply without asking, or --dry-run to only see the steps",
        )
    hooks = _Hooks(console, yes=yes)
    req = scale.AddNodeRequest(inv, resolve_inventory_path(inventory), node, payctl_home().absolute(),
                               f"scale add-node --node {node}", dry_run=dry_run)  # fmt: skip
    try:
        result = scale.add_node(req, hooks)
    finally:
        hooks.stop()
    if dry_run:
        for line in scale.describe(result.plan):
            console.print(line, markup=False)
        console.print("dry run: nothing changed", markup=False)
        return
    if not result.applied:
        raise typer.Exit(1)
    r = result.replica
    if r is not None:
        seeded = ", seeded now" if r.seeded else ""
        console.print(f"{node}: replica of {result.plan.primary} at GTID {r.primary_gtid or '-'}, "
                      f"semi-sync clients {r.semisync_clients}{seeded}", markup=False)  # fmt: skip
    for rolled in result.rolled:
        console.print(f"rolling restart {rolled.describe()}", markup=False)
    for line in result.sentinels:
        console.print(f"sentinel {line}", markup=False)
    console.print(f"{node} added to deployment {inv.deployment}: {', '.join(result.done)}", markup=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Scale the deployment out: add a node.", no_args_is_help=True)
    group.command("add-node")(add_node_cmd)
    app.add_typer(group, name="scale")
