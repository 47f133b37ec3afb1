"""`payctl render`: exact messages and exit codes; and the CI dry-run (every inventory x phase, real validators)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

import payctl.cli.render as cli_render
from payctl.cli import run
from payctl.plan import Plan
from payctl.render import RenderedFile
from payctl.render import render as real_render

REPO = Path(__file__).resolve().parents[2]
INVENTORIES = sorted(p.stem for p in (REPO / "inventories").glob("*.yml"))


def test_render_lists_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render", "-i", "inventories/ktcloud-1node.yml", "--phase", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "render: deployment ktcloud-pay, phase 1, runtime compose: 15 files on 1 node(s)"
    assert "node1/docker-compose.yml" in out and "node1/mariadb/my.cnf" in out


def test_check_passes_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render", "-i", "ktcloud-2node", "--phase", "5", "--check"]) == 0
    out = capsys.readouterr().out
    assert "50 of 50 files passed in" in out
    assert "FAIL" not in out


def test_check_failure_exits_1_and_names_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(plan: Plan) -> dict[str, RenderedFile]:
        files = real_render(plan)
        f = files["node1/nginx/nginx.conf"]
        text = f.text.replace("keepalive_timeout 30s;", "keepalive_timeout")
        files[f.key] = RenderedFile(f.node, f.path, f.kind, text, addresses=f.addresses, runtime_dirs=f.runtime_dirs)
        return files

    monkeypatch.setattr(cli_render, "render", broken)
    assert run(["render", "-i", "ktcloud-1node", "--phase", "1", "--check"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "[emerg]" in captured.out
    assert captured.err.splitlines()[0] == (
        "error: 1 rendered file(s) rejected by their validator: node1/nginx/nginx.conf"
    )


def test_missing_inventory_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render", "-i", "no-such-inventory.yml"]) == 2
    assert capsys.readouterr().err.startswith("error: inventory not found: no-such-inventory.yml")


def test_phase_the_inventory_cannot_carry_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render", "-i", "ktcloud-1node", "--phase", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: ktcloud-pay: the inventory cannot carry phase 5")


def test_bad_phase_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render", "-i", "ktcloud-1node", "--phase", "6"]) == 2


def test_out_writes_modes_and_diff_shows_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "phase4"
    assert run(["render", "-i", "ktcloud-2node", "--phase", "4", "--out", str(out)]) == 0
    env = out / "node1" / "app.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "node1" / "mariadb" / "my.cnf").stat().st_mode) == 0o644
    assert "{{SECRET:mariadb_app}}" in env.read_text()
    capsys.readouterr()
    assert run(["render", "-i", "ktcloud-2node", "--phase", "5", "--diff", str(out)]) == 0
    text = capsys.readouterr().out
    assert "+server_id = 1" not in text  # unchanged lines are not shown
    assert "+rpl_semi_sync_master_wait_point = AFTER_SYNC" in text
    assert "new node2/mariadb/my.cnf" in text
    assert "diff against" in text and "0 no longer rendered" in text


def test_help_has_examples() -> None:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "payctl"), "render", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "payctl render -i ktcloud-2node --phase 5 --check" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("phase", [1, 2, 3, 4, 5])
def test_ci_dry_run_every_inventory_and_phase(inventory: str, phase: int, capsys: pytest.CaptureFixture[str]) -> None:
    """The CI dry-run: render and check every committed inventory at every phase with the real validators."""
    rc = run(["render", "-i", str(REPO / "inventories" / f"{inventory}.yml"), "--phase", str(phase), "--check"])
    captured = capsys.readouterr()
    if phase == 5 and inventory.endswith("-1node"):
        assert rc == 2 and "cannot carry phase 5" in captured.err
        return
    assert rc == 0, captured.out + captured.err
    assert " files passed in " in captured.out


def test_check_without_root_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import payctl.validate

    monkeypatch.setattr(payctl.validate.os, "geteuid", lambda: 1000)
    assert run(["render", "-i", "ktcloud-1node", "--phase", "1", "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "error: checking nginx and Redis files needs root (they are checked inside a throwaway network namespace)"
    )
    assert err[1] == "hint: run `payctl render --check` as root, or drop --check"
