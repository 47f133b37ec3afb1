"""`payctl failover db -i INV --promote NODE (--planned | --force) [--yes] [--break-lock]` and `payctl failover redis`.
The work is in ``payctl.dbroles``; both take the deploy lock."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console

from payctl import dbroles, lock
from payctl.cli.apply import ConsoleHooks
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_BREAK_LOCK = typer.Option(False, "--break-lock", help="The first node is dead (or a stale lock is left): take the "
                           "deploy lock on the first node that answers, removing any lock found.")  # fmt: skip


def _lock_notes(console: Console) -> Callable[[lock.Taken], None]:
    def show(taken: lock.Taken) -> None:
        for node, why in taken.down.items():
            console.print(f"{node} does not answer ({why}): deploy lock taken on {taken.node} (--break-lock)",
                          markup=False)  # fmt: skip
        for node, info in taken.broken:
            console.print(f"broke the deploy lock of {info.describe()} on {node}", markup=False)

    return show


def db_cmd(
    inventory: str = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name."),
    promote: str = typer.Option(..., "--promote", help="The replica to make the MariaDB primary."),
    planned: bool = typer.Option(False, "--planned", help="Switchover with the primary alive: nothing is lost."),
    force: bool = typer.Option(False, "--force", help="The primary is gone: promote the most advanced replica."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before changing hosts."),
    break_lock: bool = _BREAK_LOCK,
) -> None:
    """Make another node the MariaDB primary, then repoint the app (under the deploy lock).

    Examples:

      payctl failover db -i lab-2node --promote node2 --planned --yes

      payctl failover db -i ktcloud-2node --promote node2 --force

      payctl failover db -i ktcloud-2node --promote node2 --force --break-lock   # node1's host is dead
    """
    if planned == force:
        raise ConfigError("pass exactly one of --planned and --force",
                          hint="--planned when the primary is alive, --force when it is gone")  # fmt: skip
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    mode: dbroles.Mode = "planned" if planned else "force"
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("payctl failover db changes hosts and asks first, but stdin is not a terminal",
                              hint="add --yes to go ahead without asking")  # fmt: skip
        if not typer.confirm(f"{mode} failover: make {promote} the MariaDB primary of '{inv.deployment}'?"):
            console.print("nothing changed (aborted)")
            raise typer.Exit(1)
    hooks = ConsoleHooks(console, yes=True)
    command = f"payctl failover db -i {inventory} --promote {promote} --{mode}" + " --break-lock" * break_lock
    req = dbroles.FailoverRequest(inv, resolve_inventory_path(inventory), promote, mode, payctl_home().absolute(),
                                  command, break_lock=break_lock)  # fmt: skip
    try:
        result = dbroles.failover_db(req, hooks, _lock_notes(console))
    finally:
        hooks.stop()
    console.print(f"{result.new_primary} is the MariaDB primary (GTID {result.gtid or '-'}); "
                  f"{result.old_primary} {'fenced/replica' if result.fenced else 'not reachable: fence it on return'}",
                  markup=False)  # fmt: skip
    if result.lost_gtids:
        console.print(f"lost GTIDs (semi-sync had fallen back to async): {result.lost_gtids}", markup=False)


def redis_cmd(
    inventory: str = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name."),
    promote: str = typer.Option(..., "--promote", help="The Redis replica to make the master."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask before changing hosts."),
    break_lock: bool = _BREAK_LOCK,
) -> None:
    """Manual Redis failover, for deployments without a witness (no safe Sentinel quorum), under the deploy lock.

    Example: payctl failover redis -i ktcloud-2node-nowitness.yml --promote node2 --yes
    """
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("payctl failover redis changes hosts and asks first, but stdin is not a terminal",
                              hint="add --yes to go ahead without asking")  # fmt: skip
        if not typer.confirm(f"make {promote} the Redis master of '{inv.deployment}'?"):
            console.print("nothing changed (aborted)")
            raise typer.Exit(1)
    hooks = ConsoleHooks(console, yes=True)
    try:
        done = dbroles.failover_redis(
            inv, payctl_home().absolute(), promote, hooks, break_lock=break_lock,
            command=f"payctl failover redis -i {inventory} --promote {promote}" + " --break-lock" * break_lock,
            inventory_path=resolve_inventory_path(inventory), on_lock=_lock_notes(console),
        )  # fmt: skip
    finally:
        hooks.stop()
    for line in done:
        console.print(line, markup=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Fail over the database (and, later, Redis).", no_args_is_help=True)
    group.command("db")(db_cmd)
    group.command("redis")(redis_cmd)
    app.add_typer(group, name="failover")
