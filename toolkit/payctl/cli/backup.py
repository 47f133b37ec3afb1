"""`payctl backup -i INV [--to DIR] [--list] [--yes]` and `payctl restore -i INV --backup ID [--until TIME] ...`.

The work is in ``payctl.dbbackup`` (nodes, connections), ``payctl.backup`` and ``payctl.restore`` (the steps).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from payctl import backup, dbbackup, restore, restoreswap
from payctl.cli.apply import ConsoleHooks
from payctl.errors import ConfigError
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name.")
_TO = typer.Option(None, "--to", help="Directory for the backups (default $PAYCTL_HOME/<deployment>/backups).")
_UNTIL = typer.Option(None, "--until", help="Point in time, ISO-8601 (offset allowed; none: UTC). Default: "
                      "everything the binlogs hold.")
_NODE = typer.Option(None, "--node", help="Node for the scratch instance (default: the backup's source node).")
_FROM = typer.Option(None, "--from", help="Directory holding the backup (default the deployment's).")
_NO_FETCH = typer.Option(False, "--no-fetch", help="Replay only the backup's own binlogs (do not fetch the source "
                         "node's binlogs written since).")


def _ask(what: str, yes: bool, console: Console) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(f"payctl {what.split()[0]} asks first, but stdin is not a terminal",
                          hint="add --yes to go ahead without asking")  # fmt: skip
    if not typer.confirm(what + "?", default=False):
        console.print("nothing changed (aborted)")
        raise typer.Exit(1)


def backup_cmd(
    inventory: str = _INVENTORY,
    to: Path | None = _TO,
    list_: bool = typer.Option(False, "--list", help="List the backups in the directory; take none."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask first."),
) -> None:
    """Take an online MariaDB backup (mariabackup, from a replica when there is one) plus the binlogs since, and copy
    it off the node with a manifest (GTID position, sha256 of every file).

    Examples:

      payctl backup -i lab-1node --yes

      payctl backup -i lab-1node --list
    """
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    home = payctl_home().absolute()
    directory = dbbackup.backups_dir(home, inv.deployment, to)
    if list_:
        found = backup.list_backups(directory)
        if not found:
            console.print(f"no backups in {directory}", markup=False)
            return
        console.print(f"{'id':<17} {'source':<14} {'gtid':<14} {'binlogs':>7} {'size MB':>8}  finished", markup=False)
        for m in found:
            console.print(f"{m.id:<17} {m.source_node + ' ' + m.source_role[0]:<14} {m.gtid:<14} {len(m.binlogs):>7} "
                          f"{m.size / 1e6:>8.1f}  {m.finished_at}", markup=False)  # fmt: skip
        return
    _ask(f"back up deployment '{inv.deployment}' into {directory}", yes, console)
    hooks = ConsoleHooks(console, yes=True)
    try:
        result = dbbackup.run_backup(dbbackup.BackupRequest(inv, home, to), hooks)
    finally:
        hooks.stop()
    m = result.manifest
    console.print(f"backup {m.id}: {m.source_node} ({m.source_role}) at GTID {m.gtid}, {len(m.files)} files, "
                  f"{m.size / 1e6:.1f} MB, sha256 in {result.directory / backup.MANIFEST}", markup=False)  # fmt: skip
    if result.pruned:
        console.print(f"retention: deleted {', '.join(result.pruned)}", markup=False)


def restore_cmd(
    inventory: str = _INVENTORY,
    backup_id: str = typer.Option(..., "--backup", help="The backup id (payctl backup --list)."),
    until: str | None = _UNTIL,
    node: str | None = _NODE,
    port: int = typer.Option(dbbackup.RESTORE_PORT, "--port", help="Port of the scratch instance."),
    source: Path | None = _FROM,
    no_fetch: bool = _NO_FETCH,
    discard: bool = typer.Option(False, "--discard", help="Stop and delete the scratch instance of this backup."),
    force: bool = typer.Option(False, "--force", help="Then put the restored data in service as the primary's "
                               "datadir (writers stopped, old datadir kept); asks for the deployment name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --force: show the plan, change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask first."),
) -> None:
    """Restore a backup into a FRESH scratch MariaDB on a node, replay the binlogs up to --until, then report the
    payments, the ledger sums and `payapp reconcile` on the restored data. The live deployment is not touched,
    unless --force: then the restored data replaces the primary's (docs/operations.md, restore runbook).

    Examples:

      payctl restore -i lab-1node --backup 20261125T163000Z --until 2026-11-25T16:42:10Z --yes

      payctl restore -i lab-1node --backup 20261125T163000Z --discard --yes

      payctl restore -i lab-1node --backup 20261125T163000Z --until 2026-11-25T16:42:10Z --force --dry-run
    """
    inv = load_inventory(inventory)
    console = Console(highlight=False, soft_wrap=True)
    home = payctl_home().absolute()
    if force:
        if discard:
            raise ConfigError("--force and --discard do not go together", hint="run them one after the other")
        at = backup.parse_until(until) if until else None
        req = dbbackup.RestoreRequest(inv, home, backup_id, at, node, port, source, fetch_binlogs=not no_fetch)
        _force(inventory, req, dry_run, yes, console)
        return
    if dry_run:
        raise ConfigError("--dry-run goes with --force", hint="a restore without --force changes no live data")
    if discard:
        _ask(f"stop and delete the scratch instance of backup {backup_id}", yes, console)
        name, removed = dbbackup.discard_restore(inv, home, backup_id, node)
        console.print(f"{name}: scratch instance of {backup_id} {'removed' if removed else 'was not there'}",
                      markup=False)  # fmt: skip
        return
    at = backup.parse_until(until) if until else None
    where = f"{node or 'the source node'}:{port}"
    _ask(f"restore backup {backup_id} up to {at.isoformat() if at else 'the end of the binlogs'} into a scratch "
         f"instance on {where}", yes, console)  # fmt: skip
    hooks = ConsoleHooks(console, yes=True)
    req = dbbackup.RestoreRequest(inv, home, backup_id, at, node, port, source, fetch_binlogs=not no_fetch)
    try:
        r = dbbackup.run_restore(req, hooks)
    finally:
        hooks.stop()
    _print_restore(r, console)
    p = console.print
    p(f"  remove it with: payctl restore -i {inventory} --backup {r.backup_id} --discard --yes", markup=False)
    if not r.ledger_balanced or r.reconciled is False:
        raise typer.Exit(3)


def _print_restore(r: restore.RestoreResult, console: Console) -> None:
    p = console.print
    p(f"restored backup {r.backup_id} on {r.node}: scratch MariaDB on port {r.port}, socket {r.socket}", markup=False)
    p(f"  replayed {r.transactions} transactions from GTID {r.start_gtid} to {r.last_gtid or r.start_gtid}"
      f" (last at {r.last_event_at or '-'}; --until {r.until.isoformat() if r.until else '-'})", markup=False)
    p(f"  payments {r.payments}, last payment id {r.last_payment_id}", markup=False)
    p(f"  ledger: debit {r.total_debit} credit {r.total_credit} -> "
      f"{'balanced' if r.ledger_balanced else 'UNBALANCED'}", markup=False)  # fmt: skip
    for line in r.reconcile:
        p(f"  reconcile: {line}", markup=False)
    if r.reconciled is not None:
        p(f"  reconciliation: {'balanced' if r.reconciled else 'NOT balanced'}", markup=False)
    laps = ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items() if k != "total")
    p(f"  took {r.timings.get('total', 0):.1f} s ({laps})", markup=False)


class _Lines:
    """Progress of --force as lines that stay on screen: the operator sees every step of a swap."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def step(self, node: str | None, step: str) -> None:
        self.console.print(f"{node or 'all':<10} {step}", markup=False)


def _force(inventory: str, req: dbbackup.RestoreRequest, dry_run: bool, yes: bool, console: Console) -> None:
    if not dry_run and not yes and not sys.stdin.isatty():
        raise ConfigError("payctl restore --force replaces the primary's data and asks first, but stdin is not a "
                          "terminal", hint="add --yes to go ahead without asking, or --dry-run to only see the "
                          "plan")  # fmt: skip
    argv = ["payctl", "restore", "-i", inventory, "--backup", req.backup_id, "--force"]
    argv += ["--until", req.until.isoformat()] if req.until else []
    freq = restoreswap.ForceRequest(req, resolve_inventory_path(inventory), " ".join(argv))
    prep = restoreswap.prepare(freq)
    for line in restoreswap.describe(prep.swap):
        console.print(line, markup=False)
    if dry_run:
        console.print("dry run: nothing changed", markup=False)
        return
    if not yes:
        dep = prep.swap.deployment
        typed = typer.prompt(f"type the deployment name ({dep}) to replace the data of {prep.swap.node}", default="",
                             show_default=False)  # fmt: skip
        if typed.strip() != dep:
            console.print("nothing changed (aborted)", markup=False)
            raise typer.Exit(1)
    restored, s = restoreswap.run_force(freq, prep, _Lines(console))
    _print_restore(restored, console)
    p = console.print
    sp = s.plan
    p(f"in service on {sp.node}: backup {sp.backup_id} up to {restored.last_event_at or '-'}; {s.payments} payments, "
      f"last payment id {s.last_payment_id}, ledger debit {s.total_debit} credit {s.total_credit}", markup=False)
    for line in s.reconcile:
        p(f"  reconcile (in service): {line}", markup=False)
    p(f"  old datadir kept as {sp.kept}", markup=False)
    p(f"  binlog continues in {s.first_binlog}, GTIDs after {s.old_gtid_state or '-'} (none of the old timeline "
      "reused)", markup=False)  # fmt: skip
    p(f"  writers out of service {s.out_of_service_s:.1f} s; every node healthy", markup=False)
    p(f"  next: take a backup of the new timeline: payctl backup -i {inventory} --yes", markup=False)


def register(app: typer.Typer) -> None:
    app.command("backup")(backup_cmd)
    app.command("restore")(restore_cmd)
