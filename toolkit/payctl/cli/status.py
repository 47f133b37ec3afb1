"""`payctl status|logs|down -i INV`: what runs where, the components' logs, and stopping a deployment.

The work is in ``payctl.operate``; this module prints (rich table or ``--json``) and asks before ``down``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from payctl import hosts, operate
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name (lab-1node, ktcloud-1node).")


def _home() -> Path:
    return payctl_home().absolute()


def status_cmd(
    inventory: str = _INVENTORY,
    as_json: bool = typer.Option(False, "--json", help="Only JSON on stdout."),
) -> None:
    """Per node: every component up/down, roles, health, versions, uptime.

    Example: payctl status -i lab-1node --json
    """
    inv = load_inventory(inventory)
    rows = operate.status(inv, _home(), hosts.is_lab(inv))
    if as_json:
        typer.echo(json.dumps({"deployment": inv.deployment, "nodes": [r.as_dict() for r in rows]}, indent=2))
        if not all(r.reachable for r in rows):
            raise typer.Exit(1)
        return
    console = Console(highlight=False, soft_wrap=True)
    for r in rows:
        if not r.reachable:
            console.print(f"[bold]{r.node}[/] ({r.address}): [red]unreachable[/]: {r.error}")
            continue
        roles = ", ".join(f"{k} {v}" for k, v in r.roles.items()) or "-"
        versions = ", ".join(f"{k} {v}" for k, v in r.versions.items())
        table = Table(title=f"{r.node} ({r.address})  health: {r.health or '-'}  roles: {roles}",
                      title_justify="left", caption=versions, caption_justify="left")  # fmt: skip
        for col in ("component", "state", "pid", "uptime"):
            table.add_column(col)
        for p in r.programs:
            color = "green" if p.state in ("RUNNING", "ACTIVE") else "red"
            table.add_row(p.name, f"[{color}]{p.state}[/]", str(p.pid or ""), p.uptime)
        if not r.programs:
            table.add_row("(nothing deployed)", "", "", "")
        console.print(table)
    if not all(r.reachable for r in rows):
        raise typer.Exit(1)


def logs_cmd(
    inventory: str = _INVENTORY,
    node: str | None = typer.Option(None, "--node", help="Only this node."),
    component: str | None = typer.Option(None, "--component", help="Only this component (app, mariadb, nginx ...)."),
    lines: int = typer.Option(50, "-n", "--lines", help="Lines of each log to show first."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines (Ctrl-C stops)."),
) -> None:
    """The components' logs without logging into the node.

    Example: payctl logs -i lab-1node --component app -f
    """
    inv = load_inventory(inventory)
    for n, text in operate.logs(inv, _home(), hosts.is_lab(inv), node=node, component=component, lines=lines,
                                follow=follow):  # fmt: skip
        for line in text.splitlines():
            typer.echo(f"{n}| {line}")


def down_cmd(
    inventory: str = _INVENTORY,
    purge_data: bool = typer.Option(False, "--purge-data", help="Also delete databases, queues and the app."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Stop every component of the deployment; data is kept unless --purge-data.

    Example: payctl down -i lab-1node --yes
    """
    inv = load_inventory(inventory)
    if not yes and not sys.stdin.isatty():
        raise ConfigError("payctl down stops the deployment and asks first, but stdin is not a terminal",
                          hint="add --yes to stop without asking")  # fmt: skip
    if not yes:
        what = "stop and DELETE THE DATA of" if purge_data else "stop"
        if not typer.confirm(f"{what} deployment '{inv.deployment}' on {len(inv.nodes)} node(s)?", default=False):
            raise typer.Exit(1)
    argv = ["payctl", "down", "-i", inventory] + (["--purge-data"] if purge_data else [])
    result = operate.down(inv, resolve_inventory_path(inventory), _home(), hosts.is_lab(inv), purge_data=purge_data,
                          command=" ".join(argv))  # fmt: skip
    console = Console(highlight=False, soft_wrap=True)
    for n in result.stopped:
        console.print(f"{n}: stopped" + (" and data purged" if result.purged else " (data kept)"))


def register(app: typer.Typer) -> None:
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("down")(down_cmd)
