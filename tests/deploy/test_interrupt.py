"""Ctrl-C during `payctl phaseN apply`: one clear line on stderr (and a hint), exit 130, no traceback.

typer turns a KeyboardInterrupt that reaches it into a silent exit 130 (that is why the lab run of the SIGINT drill
saw an empty stderr), so the apply command translates it into ``Interrupted``. A real SIGINT is sent to a real payctl
process; the only stand-in is at a seam payctl owns: ``deploy.gather_facts`` waits in the gevent hub (as the SSH reads
of a lab apply do) so the signal lands while the apply is in progress. The dry run uses the fake connector of a
non-lab inventory: no host is contacted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import payctl.deploy as deploy
from payctl.cli import run
from tests.support.services import wait_until

SLOW_FACTS = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path

    import gevent

    # A shell's background job starts with SIGINT ignored, and Python then installs no handler: a person's Ctrl-C
    # reaches a foreground payctl, so give this one the handler it would have.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import payctl.deploy as deploy
    from payctl.cli import main

    ready = Path(sys.argv[1])

    def slow_facts(*args, **kwargs):
        ready.write_text("reading facts")
        gevent.sleep(60)  # in the hub, like the SSH reads of a real apply
        raise AssertionError("SIGINT did not arrive")

    deploy.gather_facts = slow_facts
    sys.argv = ["payctl", *sys.argv[2:]]
    main()
    """
)


def _interrupted(tmp_path: Path, argv: list[str]) -> tuple[int, str, str]:
    ready = tmp_path / "ready"
    env = {**os.environ, "PAYCTL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FACTS, str(ready), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(ready.exists, timeout=30, what="payctl to start reading facts")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode, out, err


def test_ctrl_c_during_a_dry_run_prints_one_interrupted_line_and_exits_130(tmp_path: Path) -> None:
    rc, out, err = _interrupted(tmp_path, ["phase1", "apply", "-i", "ktcloud-1node", "--dry-run"])
    assert rc == 130, (out, err)
    assert err == (
        "error: interrupted (Ctrl-C) during payctl phase1 apply --dry-run\nhint: a dry run changes nothing\n"
    ), err
    assert "Traceback" not in out + err


def test_ctrl_c_during_an_apply_says_how_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process: KeyboardInterrupt leaves deploy.apply (after its cleanup, as in a real apply); the CLI's line and
    # exit code are what a person sees.
    def interrupted(req: deploy.ApplyRequest, hooks: deploy.Hooks) -> deploy.ApplyResult:
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "apply", interrupted)
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    rc = run(["phase3", "apply", "-i", "ktcloud-1node", "--yes", "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 130
    assert err == (
        "error: interrupted (Ctrl-C) during payctl phase3 apply\n"
        "hint: no deploy lock is left behind and the audit line says failed; the phase may be half-applied: run the "
        "same command again to complete it\n"
    ), err
