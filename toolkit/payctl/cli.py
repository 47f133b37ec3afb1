"""The payctl command line: parses, calls the core, prints. The only module that talks to a person."""

from __future__ import annotations

import typer

from payctl import __version__

app = typer.Typer(
    name="payctl",
    help="Take the payment service from one VM to a gated, replicated multi-node deployment.",
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"payctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """payctl: plan, render, apply and verify the payment deployment phase by phase."""


def main() -> None:
    app()
