"""`payctl lab up|down|status -i INV`: lab hosts as network namespaces on this machine (see docs/lab.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from payctl import lab
from payctl.inventory import load_inventory
from payctl.paths import payctl_home
from payctl.secrets import known_hosts_path

lab_app = typer.Typer(
    help="Lab hosts on this machine: a network namespace, sshd, prefix and cgroup per inventory node (root).",
    no_args_is_help=True,
)

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name (lab-1node, lab-2node).")


def _home() -> Path:
    return payctl_home().absolute()


def _printer(console: Console) -> lab.Progress:
    def show(step: lab.Step) -> None:
        console.print(f"  [green]+[/] {step.why}", highlight=False)

    return show


@lab_app.command("up")
def up(inventory: str = _INVENTORY) -> None:
    """Create (or repair) the lab hosts of the inventory; changes nothing when they are already up."""
    inv = load_inventory(inventory)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"lab up: deployment [bold]{inv.deployment}[/], {len(inv.nodes)} node(s)")
    steps = lab.lab_up(inv, _home(), progress=_printer(out))
    key = lab.client_key_path(_home())
    known = known_hosts_path(_home(), inv.deployment)
    out.print(f"{len(steps)} change(s)" if steps else "already up: nothing changed")
    for node in inv.nodes:
        out.print(f"  {node.name}: ssh -i {key} -o UserKnownHostsFile={known} {node.ssh.user}@{node.private_address}")


@lab_app.command("down")
def down(
    inventory: str = _INVENTORY,
    force: bool = typer.Option(
        False, "--force", help="Also remove lab hosts made from another PAYCTL_HOME, with all their data."
    ),
) -> None:
    """Stop every process in the lab hosts and remove their namespaces, links, cgroups and prefixes. No prompt."""
    inv = load_inventory(inventory)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"lab down: deployment [bold]{inv.deployment}[/], {len(inv.nodes)} node(s)")
    steps = lab.lab_down(inv, _home(), progress=_printer(out), force=force)
    out.print(f"{len(steps)} change(s)" if steps else "already down: nothing to remove")


@lab_app.command("status")
def status(
    inventory: str = _INVENTORY,
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (for machines)."),
) -> None:
    """Per node: namespace, veth, sshd and cgroup state."""
    inv = load_inventory(inventory)
    rows = lab.lab_status(inv, _home())
    if as_json:
        typer.echo(json.dumps([asdict(r) | {"up": r.up} for r in rows], indent=2))
        return
    table = Table(title=f"lab {inv.deployment}")
    for col in ("node", "address", "namespace", "veth", "sshd", "cgroup", "procs", "up"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.node,
            r.address,
            r.namespace if r.namespace_present else f"[red]{r.namespace} (absent)[/]",
            f"{r.veth} {r.veth_state}",
            f"pid {r.sshd_pid}" if r.sshd_pid else "[red]stopped[/]",
            f"{r.cgroup} ({r.cpus:g} cpu, {r.memory_gb:g} GB)" if r.cgroup_present else "[red]absent[/]",
            str(r.processes),
            "[green]yes[/]" if r.up else "[red]no[/]",
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
