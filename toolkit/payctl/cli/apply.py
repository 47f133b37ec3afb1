"""`payctl phaseN apply -i INV [--dry-run] [--yes] [--no-verify] [--only C] [--break-lock]` and `payctl lock ...`.

Prints the preview (files with a diff, packages, one-off actions, restarts), asks before changing anything (or exits 2
when stdin is not a terminal and --yes is missing), shows progress per host and step, then the health checks. The
work is done by ``payctl.deploy``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax

from payctl import audit, deploy, hosts, lock, scale
from payctl.errors import ConfigError, Interrupted
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home
from payctl.phase import PHASES, load_phase

_INVENTORY = typer.Option(..., "-i", "--inventory", help="Inventory file or bundled name (lab-1node, ktcloud-1node).")

_EXAMPLES = """

Examples:

  payctl phase1 apply -i lab-1node --yes --no-verify

  payctl phase3 apply -i inventories/ktcloud-1node.yml --dry-run
"""


def _home() -> Path:
    return payctl_home().absolute()


class ConsoleHooks:
    """Progress per host and step with rich; the confirmation prompt (or exit 2 without a terminal)."""

    def __init__(self, console: Console, *, yes: bool, quiet_diff: bool = False) -> None:
        self.console = console
        self.yes = yes
        self.quiet_diff = quiet_diff
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}

    def _ensure(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.fields[node]:<10}[/]"), TextColumn("{task.description}"),
                TimeElapsedColumn(), console=self.console, transient=True,
            )  # fmt: skip
            self.progress.start()
            self.tasks = {}
        return self.progress

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, node: str | None, step: str) -> None:
        progress = self._ensure()
        key = node or "*"
        if key not in self.tasks:
            self.tasks[key] = progress.add_task(step, node=node or "all", total=None)
        progress.update(self.tasks[key], description=step)

    def confirm(self, preview: deploy.Preview) -> bool:
        self.stop()
        show_preview(self.console, preview, diffs=not self.quiet_diff)
        if self.yes:
            return True
        answer = typer.confirm(f"Apply these changes to deployment '{preview.deployment}'?", default=False)
        if not answer:
            self.console.print("nothing changed (aborted)")
        return answer


def show_preview(console: Console, preview: deploy.Preview, *, diffs: bool = True) -> None:
    title = f"phase {preview.phase} on deployment [bold]{preview.deployment}[/]"
    if not preview.changes:
        console.print(f"{title}: nothing to change")
        return
    console.print(f"{title}: what will change")
    for w in preview.work:
        console.print(f"[bold]{w.node}[/]")
        for path in w.files:
            console.print(f"  file     {path}" + ("  (new)" if path in w.new_files else "  (changed)"))
        for a in w.artefacts:
            console.print(f"  update   {a}")
        if w.packages:
            console.print(f"  packages {', '.join(w.packages)}")
        for a in w.actions:
            console.print(f"  run      {a}")
        for r in w.restart:
            console.print(f"  restart  {r}")
        for r in w.rolling:
            console.print(f"  restart  {r}  (after the operations, one node at a time, out of the load balancer)")
        for r in w.reload:
            console.print(f"  reload   {r}")
    if diffs:
        for d in preview.diffs:
            if d.diff and not d.new:
                console.print(Syntax(d.diff, "diff", theme="ansi_dark", background_color="default"))


def _apply(phase: int, inventory: str, dry_run: bool, yes: bool, no_verify: bool, only: str | None,
           break_lock: bool) -> None:  # fmt: skip
    inv = load_inventory(inventory)
    path = resolve_inventory_path(inventory)
    console = Console(highlight=False, soft_wrap=True)
    if not dry_run and not yes and not sys.stdin.isatty():
        raise ConfigError(
            f"payctl phase{phase} apply changes hosts and asks first, but stdin is not a terminal",
            hint="add --yes to apply without asking, or --dry-run to only see what would change",
        )
    if only is None and load_phase(phase).has("second_node"):
        adding, fresh = scale.growth(inv, _home(), dry_run=dry_run)
        if fresh:
            # Nothing runs yet: the first node at phase 4, then the others join as a running deployment's would
            # (seeded replica, KRaft voters, Sentinels); a plain apply would leave them unreplicated observers.
            console.print(f"fresh deployment: phase 4 on the first node, then payctl scale add-node adds "
                          f"{', '.join(fresh)}", markup=False)  # fmt: skip
            _apply(4, inventory, dry_run, yes, True, None, break_lock)
            if dry_run:  # add-node plans from the running first node: nothing to show before it runs
                console.print(f"dry run: then payctl scale add-node -i {inventory} --node NODE for {', '.join(fresh)}",
                              markup=False)  # fmt: skip
                return
            adding = fresh
        if adding:
            # A running smaller deployment grows through `payctl scale add-node` (online replica seed, LB, Sentinels).
            from payctl.cli.scale import add_node_cmd

            them = "them" if len(adding) > 1 else "it"
            console.print(f"{', '.join(adding)} not running yet: payctl phase{phase} apply adds {them} with "
                          "payctl scale add-node", markup=False)  # fmt: skip
            for node in adding:
                add_node_cmd(inventory, node, dry_run, yes)
            if not dry_run and not no_verify:
                _gate(inventory, inv.deployment, path, phase, console)
            return
    argv = ["payctl", f"phase{phase}", "apply", "-i", inventory] + (["--only", only] if only else [])
    hooks = ConsoleHooks(console, yes=yes)
    req = deploy.ApplyRequest(inv, path, phase, _home(), " ".join(argv), dry_run=dry_run, only=only,
                              break_lock=break_lock)  # fmt: skip
    try:
        result = deploy.apply(req, hooks)
    except KeyboardInterrupt:
        # deploy.apply has released the lock and audited the apply as failed on the way out.
        left = "a dry run changes nothing" if dry_run else (
            "no deploy lock is left behind and the audit line says failed; the phase may be half-applied: "
            "run the same command again to complete it"
        )  # fmt: skip
        raise Interrupted(f"interrupted (Ctrl-C) during payctl phase{phase} apply" + (" --dry-run" if dry_run else ""),
                          hint=left) from None  # fmt: skip
    finally:
        hooks.stop()
    for node, info in result.lock_broken:
        console.print(f"[yellow]broke the deploy lock of[/] {info.describe()} [yellow]on[/] {node}")
    if dry_run:
        fake = " (fake connector: no host contacted)" if result.preview.fake else ""
        console.print(f"[bold]dry run[/]{fake}: operations phase {phase} would run")
        for w in result.preview.work:
            console.print(f"[bold]{w.node}[/]")
            for op in w.operations:
                console.print(f"  {op}")
        show_preview(console, result.preview, diffs=not result.preview.fake)
        return
    if not result.applied and result.preview.changes:
        raise typer.Exit(1)
    if not result.preview.changes:
        show_preview(console, result.preview)
    for r in result.rolled:
        console.print(f"  rolling restart {r.describe()}", markup=False)
    for h in result.health:
        mark = "[green]ok[/]" if h.ok else "[red]FAILED[/]"
        console.print(f"  health {h.node}: {h.check} {mark} {h.detail[:80]}")
    console.print(
        f"applied phase {phase} to [bold]{inv.deployment}[/] in {result.duration_s:.1f}s: "
        f"{len(result.changed_files)} file(s)/artefact(s) changed, {len(result.restarted)} restart(s)/reload(s)"
        + (f"; audit: {result.audit_path}" if result.audit_path else "")
    )
    if not no_verify:
        _gate(inventory, inv.deployment, path, phase, console)


def _gate(inventory: str, deployment: str, path: Path, phase: int, console: Console) -> None:
    """The phase's k6 gate (`payctl verify`), after a successful apply; a failed gate exits with its code and is
    recorded in the audit log (the deployment stays as applied)."""
    from payctl.cli import run

    console.print(f"gate: payctl verify -i {inventory} --phase {phase}  (skip with --no-verify)")
    started = time.monotonic()
    rc = run(["verify", "-i", inventory, "--phase", str(phase)])
    if rc == 0:
        return
    record = audit.AuditRecord(
        deployment=deployment, command=f"payctl verify -i {inventory} --phase {phase} (gate of apply)", phase=phase,
        inventory=str(path), inventory_sha256=audit.inventory_hash(path) if path.is_file() else "", nodes=(),
        result="gate-failed", error=f"payctl verify exited {rc}", duration_s=round(time.monotonic() - started, 2),
    )  # fmt: skip
    audit.append_local(_home(), record, lambda s: s)
    raise typer.Exit(rc)


def _phase_app(phase: int) -> typer.Typer:
    group = typer.Typer(help=f"Phase {phase} of the scaling plan (cumulative: brings phases 1-{phase}).",
                        no_args_is_help=True)  # fmt: skip

    @group.command("apply", help=f"Apply phase {phase} to the inventory's hosts over SSH." + _EXAMPLES)
    def apply_cmd(
        inventory: str = _INVENTORY,
        dry_run: bool = typer.Option(False, "--dry-run", help="Show the operations and changes; change nothing."),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the phase's k6 gate after applying."),
        only: str | None = typer.Option(None, "--only", help="Only files and restarts of one component (e.g. app)."),
        break_lock: bool = typer.Option(False, "--break-lock", help="Remove a stale deploy lock first."),
    ) -> None:
        _apply(phase, inventory, dry_run, yes, no_verify, only, break_lock)

    return group


lock_app = typer.Typer(help="The deploy lock of a deployment (held on its first node that answers SSH while a "
                       "command changes it).", no_args_is_help=True)  # fmt: skip


@contextmanager
def _lock_view(inventory: str) -> Iterator[tuple[list[lock.NodeLock], lock.Opener]]:
    """Every node's lock file (a node that does not answer says why) and the shells to change them."""
    inv = load_inventory(inventory)
    with hosts.node_shells(inv, _home()) as open_shell:
        yield lock.survey(deploy.lock_nodes(inv), open_shell), open_shell


def _show_down(console: Console, view: list[lock.NodeLock]) -> None:
    for v in view:
        if v.down:
            console.print(f"{v.node} is unreachable: {v.down}", markup=False)


def _checked(view: list[lock.NodeLock]) -> str:
    return ", ".join(v.node for v in view if not v.down) or "no node answers"


@lock_app.command("status")
def lock_status(inventory: str = _INVENTORY) -> None:
    """Who holds the deploy lock, if anyone, on every node that answers (a lock left on a later node while the first
    did not answer shows too). Example: payctl lock status -i lab-2node"""
    console = Console(highlight=False, soft_wrap=True)
    with _lock_view(inventory) as (view, _):
        pass
    _show_down(console, view)
    where = lock.placement(view)
    for v in view:
        if v.info is not None:
            stale = "" if v is where else f" (not the first node that answers: {where.node if where else '-'})"
            console.print(f"locked on {v.node} by {v.info.describe()}{stale}", markup=False)
    if not any(v.info for v in view):
        console.print(f"not locked (checked on {_checked(view)})", markup=False)
    if where is not None and where is not view[0]:
        console.print(f"a command run now takes the lock on {where.node} (with --break-lock: {view[0].node} does not "
                      "answer)", markup=False)  # fmt: skip


@lock_app.command("release")
def lock_release(inventory: str = _INVENTORY, yes: bool = typer.Option(False, "--yes", "-y")) -> None:
    """Remove the deploy lock on every node that answers (when the command that held it died).
    Example: payctl lock release -i lab-2node --yes"""
    if not yes and not sys.stdin.isatty():
        raise ConfigError("payctl lock release asks first, but stdin is not a terminal", hint="add --yes")
    console = Console(highlight=False, soft_wrap=True)
    with _lock_view(inventory) as (view, open_shell):
        _show_down(console, view)
        held = [v for v in view if v.info is not None]
        if not held:
            console.print(f"not locked (checked on {_checked(view)})", markup=False)
            return
        for v in held:
            assert v.info is not None
            if not yes and not typer.confirm(f"Remove the lock of {v.info.describe()} on {v.node}?", default=False):
                raise typer.Exit(1)
            lock.release_any(open_shell(v.node), v.prefix)
            console.print(f"released the lock of {v.info.describe()} on {v.node}", markup=False)


def register(app: typer.Typer) -> None:
    for phase in PHASES:
        app.add_typer(_phase_app(phase), name=f"phase{phase}")
    app.add_typer(lock_app, name="lock")
