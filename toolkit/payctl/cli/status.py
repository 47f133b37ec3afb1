"""`payctl status|logs|down -i INV`: what runs where, the components' logs, and stopping a deployment.

The work is in ``payctl.operate``; this module prints (rich table or ``--json``) and asks before ``down``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from payctl import audit, hosts, monitoring, operate
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name (lab-1node, ktcloud-1node).")


def _home() -> Path:
    return payctl_home().absolute()


def status_cmd(
    inventory: str = _INVENTORY,
    as_json: bool = typer.Option(False, "--json", help="Only JSON on stdout."),
    live: bool = typer.Option(True, "--live/--no-live",
                              help="Also read live figures (CPU, memory, RPS, p95, errors, lag, replication, disk) "
                                   "and scrape targets from Prometheus over SSH (phase 4 and later)."),
) -> None:
    """Per node: every component up/down, roles, health, versions, uptime; and live figures from Prometheus.

    Example: payctl status -i lab-1node --json
    """
    inv = load_inventory(inventory)
    rows = operate.status(inv, _home(), hosts.is_lab(inv))
    mon = monitoring.status(inv, _home(), hosts.is_lab(inv)) if live else None
    if as_json:
        nodes = [r.as_dict() for r in rows]
        doc: dict[str, object] = {"deployment": inv.deployment, "nodes": nodes,
                                  "last_change": audit.last_change(_home(), inv.deployment)}
        if mon is not None:
            for n in nodes:
                figures = mon.figures.node(str(n["node"])) if mon.figures else {}
                n.update({k: figures.get(k) for k in monitoring.FIGURES})
            doc["targets"] = [t.as_dict() for t in mon.figures.targets] if mon.figures else []
            doc["monitoring"] = ({"source": mon.figures.source, "notes": list(mon.figures.notes)} if mon.figures
                                 else {"error": mon.error, "hint": mon.hint})  # fmt: skip
        typer.echo(json.dumps(doc, indent=2))
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
        if mon is not None and mon.figures is not None and mon.figures.node(r.node):
            console.print(_figures_line(mon.figures.node(r.node)))
    if mon is not None:
        _print_monitoring(console, mon)
    last = audit.last_change(_home(), inv.deployment)
    if last is not None:
        console.print(_last_change_line(last))
    if not all(r.reachable for r in rows):
        raise typer.Exit(1)


def _last_change_line(last: Mapping[str, object]) -> str:
    """One line for the latest audited change; a failed gate stands out (the deployment stays as applied)."""
    color = "green" if last.get("result") == "ok" else "red"
    line = f"last change: {last.get('command')} -> [{color}]{last.get('result')}[/] at {last.get('when')}"
    return line + (f" ({last['error']})" if last.get("error") else "")


def _figures_line(figures: Mapping[str, float]) -> str:
    parts = [f"{k} {v:g}{monitoring.UNITS.get(k, '')}" for k, v in figures.items()]
    return "  live: " + ", ".join(parts)


def _print_monitoring(console: Console, mon: monitoring.MonitoringStatus) -> None:
    if mon.figures is None:
        console.print(f"monitoring: [yellow]no live figures[/]: {mon.error}" + (f" ({mon.hint})" if mon.hint else ""))
        return
    targets = mon.figures.targets
    bad = monitoring.unhealthy(targets)
    color = "green" if not bad else "red"
    console.print(f"monitoring: {mon.figures.source}: [{color}]{len(targets) - len(bad)}/{len(targets)} scrape "
                  "targets up[/]")  # fmt: skip
    for t in bad:
        console.print(f"  [red]{t.health}[/] {t.job} on {t.node or '?'} ({t.url}): {t.last_error}")
    for note in mon.figures.notes:
        console.print(f"  note: {note}")


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
