"""The payctl command line: parses, calls the core, prints. Only this package talks to a person.

One module per command group (``cli/plan.py``, ``cli/render.py``, ``cli/lab.py`` ...); each defines ``register(app)``
and is listed in ``_GROUPS`` below. Errors from the core (``PayctlError``) are formatted here, once.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console

from payctl import __version__
from payctl.errors import ConfigError, PayctlError

app = typer.Typer(
    name="payctl",
    help="Take the payment service from one VM to a gated, replicated multi-node deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

# Command-group modules, each with register(app: typer.Typer) -> None, listed with the top-level commands it adds.
# Only the group that a command line names is imported, so `payctl plan` does not pay for importing pyinfra;
# `payctl --help` (or an unknown command) imports them all. tests/toolkit/test_cli_root.py keeps the names true.
_GROUPS: dict[str, tuple[str, ...]] = {
    "lab": ("lab",),
    "plan": ("plan",),
    "render": ("render",),
    "verify": ("verify", "calibrate"),
    "apply": ("phase1", "phase2", "phase3", "phase4", "phase5", "lock"),
    "status": ("status", "logs", "down"),
    "scale": ("scale",),
    "failover": ("failover",),
    "backup": ("backup", "restore"),
    "upgrade": ("upgrade", "rollback"),
    "drill": ("drill",),
}

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"payctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """payctl: plan, render, apply and verify the payment deployment phase by phase."""


def report_error(exc: PayctlError) -> int:
    """Print a PayctlError the one way payctl prints errors; returns its exit code."""
    err_console.print(f"[bold red]error:[/] {exc.message}", markup=True)
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            err_console.print(f"  - {problem}", markup=False)
    if exc.hint:
        err_console.print(f"[bold]hint:[/] {exc.hint}", markup=True)
    return exc.exit_code


def _crash_log(exc: BaseException) -> Path:
    log = Path.cwd() / ".payctl" / "crash.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return log


_registered: set[str] = set()


def _groups_for(argv: list[str]) -> list[str]:
    """The command groups a command line needs: the one owning its command, or all of them."""
    command = next((a for a in argv if not a.startswith("-")), None)
    owners = [group for group, names in _GROUPS.items() if command in names]
    return owners or list(_GROUPS)


def _register_groups(groups: list[str]) -> None:
    for name in groups:
        if name not in _registered:
            _registered.add(name)
            importlib.import_module(f"payctl.cli.{name}").register(app)


def run(argv: list[str]) -> int:
    """Run payctl with argv and return its exit code; every error is printed here, once. Tests call this."""
    _register_groups(_groups_for(argv))
    try:
        rc = app(args=argv, prog_name="payctl", standalone_mode=False)
    except PayctlError as exc:
        return report_error(exc)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except typer.TyperException as exc:
        # Usage errors (typer vendors click): click's own message and exit code 2.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(f"error: {exc}", markup=False)
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:
        # The last line of defence: one line for the user, the traceback to a file.
        log = _crash_log(exc)
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (traceback in {log})")
        return 70
    return rc if isinstance(rc, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
