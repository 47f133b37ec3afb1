"""`payctl render -i INV [--phase N] [--out DIR] [--check] [--diff DIR]`: the config files of a phase, rendered by
``payctl.render`` and checked by ``payctl.validate``; printed here as rich tables."""

from __future__ import annotations

import difflib
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from payctl.errors import PayctlError, ValidationFailed
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import RenderedFile, render
from payctl.validate import CheckResult, validate_files

_EXAMPLES = """

Examples:

  payctl render -i inventories/ktcloud-1node.yml --phase 1

  payctl render -i ktcloud-2node --phase 5 --check

  payctl render -i lab-2node --phase 5 --out build/lab --check

  payctl render -i ktcloud-2node --phase 5 --diff build/ktcloud-phase4
"""


def write_tree(files: dict[str, RenderedFile], out: Path) -> None:
    """Write files under ``out/<node>/<path>`` with their modes (secrets stay placeholders)."""
    for f in files.values():
        target = out / f.node / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.text)
        os.chmod(target, f.mode)


def _diff(files: dict[str, RenderedFile], old: Path, console: Console) -> tuple[int, int, int]:
    changed = added = 0
    for f in files.values():
        before_path = old / f.node / f.path
        before = before_path.read_text() if before_path.is_file() else None
        if before == f.text:
            continue
        if before is None:
            added += 1
            console.print(f"[bold green]new[/] {escape(f.key)}")
            continue
        changed += 1
        lines = difflib.unified_diff(
            before.splitlines(keepends=True), f.text.splitlines(keepends=True), f"a/{f.key}", f"b/{f.key}"
        )
        console.print("".join(lines), markup=False, highlight=False, end="")
    wanted = {f"{f.node}/{f.path}" for f in files.values()}
    gone = 0
    if old.is_dir():
        for p in sorted(old.rglob("*")):
            if p.is_file() and str(p.relative_to(old)) not in wanted:
                gone += 1
                console.print(f"[bold red]no longer rendered[/] {escape(str(p.relative_to(old)))}")
    return changed, added, gone


def _files_table(files: dict[str, RenderedFile]) -> Table:
    table = Table(title="rendered files", title_justify="left")
    for col in ("file", "kind", "mode", "bytes", "what"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for f in files.values():
        what = f.description + (" [write-once]" if f.write_once else "")
        table.add_row(escape(f.key), str(f.kind), oct(f.mode)[2:], str(len(f.text)), escape(what))
    return table


def _check_table(results: list[CheckResult]) -> Table:
    table = Table(title="checks (real validators)", title_justify="left")
    for col in ("file", "validator", "result", "s", "detail"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for r in results:
        verdict = "[green]ok[/]" if r.ok else "[bold red]FAIL[/]"
        table.add_row(escape(r.key), escape(r.validator), verdict, f"{r.seconds:.2f}", escape(r.detail))
    return table


def register(app: typer.Typer) -> None:
    @app.command("render", help="Render the config files of an inventory at a phase, and check them." + _EXAMPLES)
    def render_cmd(
        inventory: str = typer.Option(
            ..., "-i", "--inventory", help="Inventory file, or a bundled name (ktcloud-1node, lab-2node ...)."
        ),
        phase: int = typer.Option(1, "--phase", min=1, max=5, help="Phase 1-5 (cumulative)."),
        out_dir: str | None = typer.Option(None, "--out", help="Write the files to DIR/<node>/<path>."),
        check: bool = typer.Option(
            False, "--check", help="Check every file with the program that reads it (needs root: network namespaces)."
        ),
        diff_dir: str | None = typer.Option(None, "--diff", help="Show what changed against a tree written by --out."),
        jobs: int = typer.Option(4, "--jobs", min=1, max=32, help="Validators run in parallel."),
        allow_overcommit: bool = typer.Option(
            False, "--allow-overcommit", help="Over-commit of CPU/memory/disk becomes a warning instead of an error."
        ),
    ) -> None:
        console = Console(highlight=False, width=160)
        out = Path(out_dir) if out_dir is not None else None
        diff = Path(diff_dir) if diff_dir is not None else None
        inv = load_inventory(inventory)
        plan = make_plan(inv, load_phase(phase), allow_overcommit=allow_overcommit)
        files = render(plan)
        console.print(
            f"[bold]render[/]: deployment [bold]{plan.deployment}[/], phase {plan.phase}, runtime {plan.runtime}: "
            f"{len(files)} files on {len({f.node for f in files.values()})} node(s)"
        )
        if diff is not None:
            if not diff.is_dir():
                raise PayctlError(f"--diff: {diff} is not a directory", hint="give a tree written by `--out`")
            changed, added, gone = _diff(files, diff, console)
            console.print(f"diff against {diff}: {changed} changed, {added} new, {gone} no longer rendered")
        if out is not None:
            write_tree(files, out)
            console.print(f"wrote {len(files)} files under {out} (secrets are {{{{SECRET:name}}}} placeholders)")
        if not check:
            if diff is None:
                console.print(_files_table(files))
            return
        addresses = [a for n in inv.nodes for a in (n.private_address, n.public_address) if a]
        start = time.monotonic()
        results = validate_files(files, addresses, jobs=jobs)
        elapsed = time.monotonic() - start
        console.print(_check_table(results))
        failed = [r for r in results if not r.ok]
        console.print(f"{len(results) - len(failed)} of {len(results)} files passed in {elapsed:.1f} s")
        if failed:
            raise ValidationFailed(
                f"{len(failed)} rendered file(s) rejected by their validator: {', '.join(r.key for r in failed)}",
                hint="the table above shows each validator's message; fix the template or the plan",
            )
