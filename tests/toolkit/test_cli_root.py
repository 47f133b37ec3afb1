from __future__ import annotations

import pytest

from payctl import __version__
from payctl.cli import run


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"payctl {__version__}\n"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["no-such-command"]) == 2
    assert "No such command 'no-such-command'" in capsys.readouterr().err


def test_each_group_declares_exactly_the_commands_it_registers() -> None:
    import importlib

    import typer
    from typer.main import get_command

    from payctl.cli import _GROUPS

    for group, names in _GROUPS.items():
        scratch = typer.Typer()

        @scratch.callback()
        def _root() -> None:
            pass

        importlib.import_module(f"payctl.cli.{group}").register(scratch)
        assert sorted(get_command(scratch).commands) == sorted(names), group  # type: ignore[attr-defined]


def test_plan_does_not_import_pyinfra() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from payctl.cli import run\n"
        "rc = run(['plan', '-i', 'lab-1node', '--json'])\n"
        "print('pyinfra' in sys.modules, rc, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "False 0", out.stderr
