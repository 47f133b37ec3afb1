"""Backup pieces without a lab: manifest, retention, time parsing, command building, the rendered schedule (golden
files, the real validators) and the daily script run against a real MariaDB."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from payctl import backup, restore
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import render
from payctl.validate import validate_files
from tests.support.services import MariaDB

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "backup"


def _m(backup_id: str, size: int) -> backup.Manifest:
    return backup.Manifest(backup_id, "d", "2026-11-25T10:00:00+00:00", "2026-11-25T10:00:05+00:00", "node2",
                           "replica", "0-1-42", "mysql-bin.000003", 385, ("mysql-bin.000003",),
                           (backup.FileEntry(backup.BASE, size, "a" * 64),))  # fmt: skip


def test_manifest_round_trips_and_ids_sort_by_time() -> None:
    m = _m("20261125T100000Z", 10)
    assert backup.Manifest.from_json(m.to_json()) == m
    assert backup.new_id(datetime(2026, 11, 26, 1, 2, 3, tzinfo=timezone(timedelta(hours=9)))) == "20261125T160203Z"
    assert m.finished == datetime(2026, 11, 25, 10, 0, 5, tzinfo=UTC)


def test_retention_keeps_n_within_the_budget_and_never_the_newest() -> None:
    ms = [_m(f"2026112{d}T000000Z", 4) for d in range(1, 6)]  # 5 backups of 4 bytes
    assert backup.to_prune(ms, backup.Retention(3, 0)) == ["20261121T000000Z", "20261122T000000Z"]
    assert backup.to_prune(ms, backup.Retention(7, 9)) == [m.id for m in ms[:3]]  # 2 fit in 9 bytes
    assert backup.to_prune([_m("20261125T000000Z", 100)], backup.Retention(7, 9)) == []  # the newest stays
    assert backup.retention_for(12.5) == backup.Retention(backup.KEEP, 12_500_000_000)
    assert backup.retention_for(None).budget_bytes == 0


def test_until_is_utc_unless_it_has_an_offset_and_stops_at_its_second() -> None:
    assert backup.parse_until("2026-11-26T01:42:10+09:00") == datetime(2026, 11, 25, 16, 42, 10, tzinfo=UTC)
    assert backup.parse_until("2026-11-25T16:42:10Z") == datetime(2026, 11, 25, 16, 42, 10, tzinfo=UTC)
    assert backup.parse_until("2026-11-25 16:42:10.7") == datetime(2026, 11, 25, 16, 42, 10, 700000, tzinfo=UTC)
    assert backup.stop_datetime(backup.parse_until("2026-11-26T01:42:10.7+09:00")) == "2026-11-25 16:42:10"
    with pytest.raises(backup.BackupError, match="not an ISO-8601 time") as bad:
        backup.parse_until("yesterday")
    assert "+09:00" in bad.value.hint


def test_until_before_the_backups_end_is_refused_with_a_hint() -> None:
    m = _m("20261125T100000Z", 1)
    restore.check_until(m, datetime(2026, 11, 25, 10, 0, 5, tzinfo=UTC))  # at the end: fine
    with pytest.raises(backup.BackupError, match="before the end of backup 20261125T100000Z") as exc:
        restore.check_until(m, datetime(2026, 11, 25, 10, 0, 4, tzinfo=UTC))
    assert "older backup" in exc.value.hint


def test_replay_command_starts_after_the_gtid_and_stops_in_utc() -> None:
    cmd = restore.replay_command(["/r/binlogs/mysql-bin.000003", "/r/binlogs/mysql-bin.000004"], "0-1-42",
                                 backup.parse_until("2026-11-26T01:42:10+09:00"), "/r/replay.sql")  # fmt: skip
    assert cmd == ("TZ=UTC mariadb-binlog --start-position=0-1-42 --stop-datetime='2026-11-25 16:42:10' "
                   "/r/binlogs/mysql-bin.000003 /r/binlogs/mysql-bin.000004 > /r/replay.sql")  # fmt: skip
    assert "--stop-datetime" not in restore.replay_command(["/b.000001"], "0-1-1", None, "/o")
    assert restore.binlog_order(["b.000010", "b.000009", "b.000010"]) == ["b.000009", "b.000010"]
    n, last, at = restore.parse_replay("#251125 16:48:01 server id 7  end_log_pos 367 CRC32 0x2 \tGTID 0-7-1 ddl\n"
                                       "#251125  9:48:02 server id 7  end_log_pos 400 CRC32 0x3 \tGTID 0-7-2 trans\n")
    assert (n, last, at) == (2, "0-7-2", "2025-11-25T09:48:02+00:00")


def test_reconcile_days_are_business_days_in_the_app_time_zone() -> None:
    start = datetime(2026, 11, 25, 14, 30, tzinfo=UTC)  # 23:30 in Seoul
    assert restore.reconcile_days(start, start + timedelta(hours=1), "Asia/Seoul") == (
        datetime(2026, 11, 25).date(), datetime(2026, 11, 26).date())


def test_node_script_uses_the_option_file_and_never_a_password_on_a_command_line() -> None:
    text = backup.node_script(backup.NodeLayout("/p/mariadb/backup.cnf", "/p/run/backup.lock", "/p/venv/bin/python"))
    assert "mariadb-backup --defaults-file=/p/mariadb/backup.cnf --backup --slave-info" in text
    assert "flock -n 9" in text and f"exit {backup.EXIT_BUSY}" in text
    assert "password" not in text and not re.search(r"\s-p\S", text)


# ------------------------------------------------------------------------------------------------ rendered schedule


def _native_vm_plan():  # type: ignore[no-untyped-def]
    inv = load_inventory("ktcloud-1node").model_copy(update={"runtime": "native"})
    return make_plan(inv, load_phase(1))


def _backup_files(plan) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {k: f.text for k, f in render(plan).items() if "backup" in k}


@pytest.mark.parametrize("case", ["lab-1node", "vm-native"])
def test_rendered_backup_files_match_their_golden_files(case: str, update_golden: bool) -> None:
    plan = make_plan(load_inventory("lab-1node"), load_phase(4)) if case == "lab-1node" else _native_vm_plan()
    files = _backup_files(plan)
    root = GOLDEN / case
    if update_golden:
        for key, text in files.items():
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_text(text)
        return
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(files), "rendered backup files differ from the golden set (--update-golden)"
    for key, text in files.items():
        assert (root / key).read_text() == text, f"{case}: {key} differs from its golden file (--update-golden)"


def test_lab_runs_the_daily_backup_under_supervisor_and_vms_with_a_systemd_timer() -> None:
    lab = render(make_plan(load_inventory("lab-1node"), load_phase(4)))
    conf = lab["node1/supervisor/supervisord.conf"].text
    prefix = make_plan(load_inventory("lab-1node"), load_phase(4)).node("node1").prefix
    assert f"[program:payctl-backup]\ncommand=/bin/bash {prefix}/mariadb/backup-daily.sh loop\n" in conf
    assert "node1/mariadb/payctl-backup.timer" not in lab
    assert "GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR, SLAVE MONITOR ON *.* TO 'backup'@'localhost'" in \
        lab["node1/mariadb/users.sql"].text
    vm = render(_native_vm_plan())
    assert "OnCalendar=*-*-* 18:30:00 UTC" in vm["node1/mariadb/payctl-backup.timer"].text
    daily = vm["node1/mariadb/backup-daily.sh"].text
    assert "[ \"$n\" -lt 7 ] && [ $((used + size)) -le " in daily  # keep 7 within the plan's backups item


def test_rendered_backup_files_pass_their_validators() -> None:
    files = {k: f for k, f in render(_native_vm_plan()).items() if "backup" in k}
    files |= {k: f for k, f in render(make_plan(load_inventory("lab-1node"), load_phase(4))).items()
              if "backup" in k or k.endswith("supervisord.conf")}  # fmt: skip
    compose = render(make_plan(load_inventory("ktcloud-1node"), load_phase(1)))
    files |= compose  # the compose file reads the node's env files: check the whole node
    results = validate_files(files)
    assert [r.key for r in results if not r.ok] == [], [r.detail for r in results if not r.ok]
    assert any(r.key.endswith("payctl-backup.timer") and "systemd" in r.validator for r in results)
    for key in (k for k in files if k.endswith(".sh")):
        subprocess.run(["bash", "-n"], input=files[key].text, text=True, check=True)


# ------------------------------------------------------------------------------------------------ the daily script


@pytest.fixture
def small_db(tmp_path: Path) -> Iterator[MariaDB]:
    db = MariaDB(tmp_path / "db", server_id=9).start()
    db.sql(f"CREATE USER 'backup'@'localhost' IDENTIFIED BY 'bpw'; GRANT {backup.BACKUP_GRANTS} ON *.* TO "
           "'backup'@'localhost'; CREATE DATABASE payments; CREATE TABLE payments.t (i INT PRIMARY KEY); "
           "INSERT INTO payments.t VALUES (1)")  # fmt: skip
    try:
        yield db
    finally:
        db.stop()


@pytest.mark.slow
def test_daily_script_takes_a_backup_and_keeps_only_what_retention_allows(small_db: MariaDB, tmp_path: Path) -> None:
    cnf = tmp_path / "backup.cnf"
    auth = f"user=backup\npassword=bpw\nsocket={small_db.socket_path}\n"
    cnf.write_text(f"[client]\n{auth}[mariabackup]\n{auth}datadir={small_db.datadir}\n")
    node = tmp_path / "backup.sh"
    node.write_text(backup.node_script(backup.NodeLayout(str(cnf), str(tmp_path / "lock"))))
    daily = tmp_path / "daily.sh"
    daily.write_text(backup.daily_script(str(node), str(tmp_path / "backups"), backup.Retention(1, 0)))
    for _ in range(2):
        out = subprocess.run(["bash", str(daily), "once"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        time.sleep(1.1)
    kept = sorted(p.name for p in (tmp_path / "backups").iterdir())
    assert len(kept) == 1 and backup.ID_RE.match(kept[0])
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "backups" / kept[0], capture_output=True,
                           text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "gtid=0-9-" in (tmp_path / "backups" / kept[0] / "info").read_text()
    # a second backup while one holds the node's lock: refused with its own exit code
    with (tmp_path / "lock").open("w") as fh:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)
        busy = subprocess.run(["bash", str(node), str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert busy.returncode == backup.EXIT_BUSY and "another backup is running" in busy.stderr


def test_a_gap_in_the_binlogs_is_refused_before_replaying() -> None:
    restore.check_contiguous(["b.000009", "b.000010", "b.000011"])
    with pytest.raises(backup.BackupError, match=r"between b\.000009 and b\.000011 are missing"):
        restore.check_contiguous(["b.000009", "b.000011"])


def test_restore_never_targets_the_live_mariadb_port() -> None:
    from payctl import dbbackup

    plan = make_plan(load_inventory("lab-1node"), load_phase(4))
    m = _m("20261125T100000Z", 1)
    m = backup.Manifest(**{**m.__dict__, "source_node": "node1"})
    with pytest.raises(backup.BackupError, match="port 3306 is the live MariaDB's") as exc:
        dbbackup.restore_target(plan, m, None, 3306, None, "pw", lab=True)  # type: ignore[arg-type]
    assert "--port" in exc.value.hint
    t = dbbackup.restore_target(plan, m, None, 3307, None, "pw", lab=True)  # type: ignore[arg-type]
    assert (t.name, t.address, t.port, t.run_as) == ("node1", "10.77.0.11", 3307, "root")
    assert t.workdir == f"{plan.node('node1').prefix}/restore/20261125T100000Z"
    assert t.payapp.endswith("/current/bin/payapp") and t.db_url == "mysql://app:pw@10.77.0.11:3307/payments"


def test_compose_backs_up_inside_the_mariadb_container_and_payctl_backup_says_so(tmp_path: Path) -> None:
    from payctl import dbbackup

    files = render(make_plan(load_inventory("ktcloud-1node"), load_phase(1)))
    service = files["node1/mariadb/payctl-backup.service"].text
    assert "exec -T mariadb /bin/bash /etc/payctl/backup/backup-daily.sh once" in service
    compose = files["node1/docker-compose.yml"].text
    assert '"./mariadb/backup.cnf:/etc/payctl/backup/backup.cnf:ro"' in compose
    assert '"./backups:/var/backups/payctl"' in compose
    assert "socket=/run/mysqld/mysqld.sock" in files["node1/mariadb/backup.cnf"].text
    with pytest.raises(backup.BackupError, match="runs on compose") as exc:
        dbbackup.run_backup(dbbackup.BackupRequest(load_inventory("ktcloud-1node"), tmp_path), None)  # type: ignore[arg-type]
    assert "payctl-backup.timer" in exc.value.hint


def test_a_deployment_made_before_the_backup_account_gets_its_secret_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    import yaml

    from payctl.deploy import secrets_fingerprint
    from payctl.errors import PayctlError
    from payctl.secrets import load_or_create, secrets_path

    s = load_or_create(tmp_path, "lab", allow_create=True)
    before = secrets_fingerprint(s)
    path = secrets_path(tmp_path, "lab")
    doc = yaml.safe_load(path.read_text())
    del doc["secrets"]["mariadb_backup"]
    path.write_text(yaml.safe_dump(doc))
    again = load_or_create(tmp_path, "lab", allow_create=False)  # live: the new name is generated, nothing refused
    assert again["mariadb_root"] == s["mariadb_root"] and again["mariadb_backup"] != s["mariadb_backup"]
    assert secrets_fingerprint(again) == before  # the marker on the hosts still matches
    doc = yaml.safe_load(path.read_text())
    del doc["secrets"]["mariadb_backup"], doc["secrets"]["mariadb_app"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PayctlError, match="secrets mariadb_app are missing"):
        load_or_create(tmp_path, "lab", allow_create=False)


def test_the_scratch_socket_fits_a_unix_socket_path_however_deep_the_workdir() -> None:
    from payctl import restore

    def target(workdir: str) -> restore.Target:
        return restore.Target("node1", None, workdir, "127.0.0.1", 3307, "root", "mariadb -uroot", "", "")  # type: ignore[arg-type]

    short = target("/opt/payctl/restore/20261126T001934Z")
    assert short.socket == "/opt/payctl/restore/20261126T001934Z/run/mariadb.sock"
    deep = "/tmp/pytest-of-root/pytest-556/popen-gw1/test_backup_under_writes_then_0/restore/20261126T001934Z"
    assert len(f"{deep}/run/mariadb.sock") > 107  # what made mariadbd abort under xdist
    sock = target(deep).socket
    assert len(sock) <= 107 and sock.startswith("/tmp/payctl-restore-") and sock == target(deep).socket
    assert sock != target(deep + "x").socket
