"""`payctl backup` / `payctl restore` as a user sees them without a lab: the listing, and the refusals with their
exact message, hint and exit code (nothing is contacted for any of them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from payctl import backup
from payctl.cli import run


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    return tmp_path


def _store(home: Path) -> backup.Manifest:
    m = backup.Manifest("20261125T170312Z", "lab", "2026-11-25T17:03:12+00:00", "2026-11-25T17:03:18+00:00", "node2",
                        "replica", "0-1-1234", "mysql-bin.000003", 385, ("mysql-bin.000003", "mysql-bin.000004"),
                        (backup.FileEntry(backup.BASE, 2_900_000, "a" * 64),))  # fmt: skip
    d = home / "lab" / "backups" / m.id
    d.mkdir(parents=True)
    (d / backup.MANIFEST).write_text(m.to_json())
    return m


def test_list_shows_every_backup_with_its_position(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    assert run(["backup", "-i", "lab-1node", "--list"]) == 0
    assert capsys.readouterr().out.strip() == f"no backups in {home / 'lab' / 'backups'}"
    _store(home)
    assert run(["backup", "-i", "lab-1node", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "source", "gtid", "binlogs", "size", "MB", "finished"]
    assert lines[1].split() == ["20261125T170312Z", "node2", "r", "0-1-1234", "2", "2.9", "2026-11-25T17:03:18+00:00"]


def test_unknown_backup_id_names_the_ones_there(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    _store(home)
    assert run(["restore", "-i", "lab-1node", "--backup", "20261125T999999Z", "--yes"]) == 1
    err = capsys.readouterr().err
    assert f"error: no backup '20261125T999999Z' in {home / 'lab' / 'backups'}" in err
    assert "hint: backups there: 20261125T170312Z (payctl backup -i INV --list)" in err


def test_checksum_mismatch_stops_before_any_host(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    m = _store(home)
    (home / "lab" / "backups" / m.id / backup.BASE).write_bytes(b"not the backup")
    assert run(["restore", "-i", "lab-1node", "--backup", m.id, "--yes"]) == 1
    err = capsys.readouterr().err
    assert f"error: backup {m.id}: checksum mismatch in base.tar.gz (manifest aaaaaaaaaaaa…" in err
    assert "nothing was restored" in err


def test_a_time_that_is_not_iso_8601_is_refused(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    m = _store(home)
    assert run(["restore", "-i", "lab-1node", "--backup", m.id, "--until", "tomorrow", "--yes"]) == 1
    assert "error: --until 'tomorrow' is not an ISO-8601 time" in capsys.readouterr().err


def test_compose_deployments_and_unattended_runs_are_told_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["backup", "-i", "ktcloud-1node", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "error: payctl backup/restore drive native deployments; ktcloud-pay runs on compose" in err
    assert "payctl-backup.timer" in err
    assert run(["backup", "-i", "lab-1node"]) == 2  # no terminal, no --yes
    assert "hint: add --yes to go ahead without asking" in capsys.readouterr().err
