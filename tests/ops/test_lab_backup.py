"""The issue's backup test in the lab (shared lab-1node phase-4 deployment): a backup under load, more payments, a
restore to a point in time between two known payments, exactly the payments before that point, balanced ledger.

Load: one thread, at most 15 authorizations/s through the lab LB (10.77.0.11), stopped by the test (hard cap 20 s of
sending and 300 requests). The scratch instance is removed at the end; the deployment itself is never touched.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from payctl.backup import Manifest, list_backups
from payctl.cli import run
from tests.support.labs import SharedLab, mariadb_sql

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-1node", 4)]
LB = "http://10.77.0.11"


@dataclass
class Load:
    rps: float = 15
    max_requests: int = 300
    max_sending_s: float = 20
    paused: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    acked: int = 0
    failed: list[str] = field(default_factory=list)
    sending_s: float = 0.0

    def _one(self) -> None:
        body = {"merchantId": "m-backup", "amount": 1000, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex}
        req = urllib.request.Request(f"{LB}/payments/authorize", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status in (200, 201):
                    self.acked += 1
                    return
                self.failed.append(str(resp.status))
        except (urllib.error.URLError, OSError) as exc:
            self.failed.append(str(exc)[:100])

    def run(self) -> None:
        sent = 0
        while not self.stop.is_set() and sent < self.max_requests and self.sending_s < self.max_sending_s:
            if self.paused.is_set():
                time.sleep(0.02)
                continue
            t = time.monotonic()
            self._one()
            sent += 1
            time.sleep(max(0.0, 1 / self.rps - (time.monotonic() - t)))
            self.sending_s += time.monotonic() - t


def sql(socket: str, statement: str) -> str:
    return mariadb_sql(socket, statement)


def test_backup_under_load_then_point_in_time_restore_between_two_payments(
    shared_lab: SharedLab, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = shared_lab.inventory.node_prefix("node1")
    live = f"{prefix}/run/mariadb.sock"
    load = Load()
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        assert run(["backup", "-i", "lab-1node", "--yes"]) == 0, capsys.readouterr()
        backup_s = time.monotonic() - t0
        out = capsys.readouterr().out
        assert "backup " in out and "sha256 in" in out, out
        time.sleep(2)  # keep writing after the backup
        load.paused.set()
        time.sleep(0.5)  # the request in flight finishes
        last_before = int(sql(live, "SELECT MAX(payment_id) FROM payments.payment"))
        time.sleep(1.2)
        until = datetime.now(UTC)
        time.sleep(1.2)
        load.paused.clear()
        time.sleep(2)  # and more payments after the restore point
    finally:
        load.stop.set()
        thread.join(30)
    assert load.acked > 30 and not load.failed, (load.acked, load.failed[:5])
    first_after = int(sql(live, f"SELECT MIN(payment_id) FROM payments.payment WHERE payment_id > {last_before}"))
    expected = sql(live, f"SELECT payment_id FROM payments.payment WHERE payment_id <= {last_before} "
                         "ORDER BY payment_id").split()  # fmt: skip

    m: Manifest = list_backups(shared_lab.home / "lab" / "backups")[-1]
    assert m.source_node == "node1" and m.source_role == "primary" and m.binlogs and m.schema_version
    assert all(len(f.sha256) == 64 for f in m.files)
    t0 = time.monotonic()
    rc = run(["restore", "-i", "lab-1node", "--backup", m.id, "--until", until.isoformat(), "--yes"])
    restore_s = time.monotonic() - t0
    report = capsys.readouterr()
    try:
        assert rc == 0, report.out + report.err
        scratch = f"{prefix}/restore/{m.id}/run/mariadb.sock"
        restored = sql(scratch, "SELECT payment_id FROM payments.payment ORDER BY payment_id").split()
        assert restored == expected  # exactly the payments committed before the restore point
        assert str(first_after) not in restored
        assert f"payments {len(expected)}, last payment id {last_before}" in report.out
        assert "balanced" in report.out and "UNBALANCED" not in report.out
        debit, credit = sql(scratch, "SELECT SUM(IF(direction = 'DEBIT', amount, 0)), "
                                     "SUM(IF(direction = 'CREDIT', amount, 0)) FROM payments.ledger_entry").split()
        assert debit == credit
        assert "reconciliation: balanced" in report.out
        # reconcile judged every restored payment of the Seoul business day(s) the replay covered
        midnight = datetime.now(ZoneInfo("Asia/Seoul")).replace(hour=0, minute=0, second=0, microsecond=0)
        today = sql(live, f"SELECT COUNT(*) FROM payments.payment WHERE payment_id <= {last_before} AND created_at >= "
                          f"'{midnight.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')}'")  # fmt: skip
        assert f"payments={today} " in report.out
        # the same scratch place again: refused as busy, with the way out
        assert run(["restore", "-i", "lab-1node", "--backup", m.id, "--yes"]) == 1
        assert "already runs there" in capsys.readouterr().err
    finally:
        assert run(["restore", "-i", "lab-1node", "--backup", m.id, "--discard", "--yes"]) == 0
    assert "removed" in capsys.readouterr().out
    assert run(["restore", "-i", "lab-1node", "--backup", "20200101T000000Z", "--yes"]) == 1
    assert "no backup '20200101T000000Z'" in capsys.readouterr().err
    # the deployment still serves
    with urllib.request.urlopen(f"{LB}/health", timeout=5) as resp:
        assert resp.status == 200
    print(f"\nlab backup: {backup_s:.1f} s ({m.size / 1e6:.1f} MB); restore to --until: {restore_s:.1f} s; "
          f"{len(expected)} payments restored\n$ payctl backup -i lab-1node --yes\n{out.strip()}\n"
          f"$ payctl restore -i lab-1node --backup {m.id} --until {until.isoformat()} --yes\n{report.out.strip()}")
