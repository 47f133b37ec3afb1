"""`payctl restore --force` in the lab (shared lab-1node phase-4 deployment, after the backup test): a backup, more
payments, then the primary's data replaced by a restore to a point between two known payments.

Checked: unattended runs without --yes are refused (exit 2) and --dry-run changes nothing; after the swap the live
primary holds exactly the payments committed before the point, the old datadir is kept, binlog names and GTID
sequence numbers continue after the old server's, the app takes new payments, the ledger balances and the audit log
has the run. The deployment is left serving (the add-node test grows it next).

Payments: at most 60 authorizations, one at a time, through the lab LB (10.77.0.11).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from datetime import UTC, datetime

import pytest

from payctl.backup import list_backups
from tests.support.labs import PAYCTL, SharedLab, mariadb_sql
from tests.support.loads import LB, authorize

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-1node", 4, order=1)]


def sql(socket: str, statement: str) -> str:
    return mariadb_sql(socket, statement)


def pay(n: int) -> None:
    for _ in range(n):
        code, detail = authorize("m-restore-force")
        assert code in (200, 201), (code, detail)


def test_restore_force_puts_a_point_in_time_in_service(shared_lab: SharedLab) -> None:
    prefix = shared_lab.inventory.node_prefix("node1")
    live = f"{prefix}/run/mariadb.sock"
    pay(10)
    r = shared_lab.payctl("backup", "-i", "lab-1node", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    backup_id = list_backups(shared_lab.home / "lab" / "backups")[-1].id
    pay(15)  # after the backup, before the point
    time.sleep(0.5)
    last_before = int(sql(live, "SELECT MAX(payment_id) FROM payments.payment"))
    time.sleep(1.2)
    until = datetime.now(UTC).isoformat()
    time.sleep(1.2)
    pay(15)  # after the point: gone after the restore
    expected = sql(live, f"SELECT payment_id FROM payments.payment WHERE payment_id <= {last_before} "
                         "ORDER BY payment_id").split()  # fmt: skip
    after = sql(live, f"SELECT payment_id FROM payments.payment WHERE payment_id > {last_before}").split()
    assert len(after) >= 15
    old_file = sql(live, "SHOW MASTER STATUS").split()[0]
    old_seq = max(int(g.rsplit("-", 1)[1]) for g in sql(live, "SELECT @@gtid_binlog_state").split(","))
    argv = ("restore", "-i", "lab-1node", "--backup", backup_id, "--until", until, "--force")

    unattended = subprocess.run([*PAYCTL, *argv], capture_output=True, text=True, env=shared_lab.env(),
                                stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert unattended.returncode == 2, unattended.stdout + unattended.stderr
    assert "stdin is not a terminal" in unattended.stderr and "add --yes" in unattended.stderr
    dry = shared_lab.payctl(*argv, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "REPLACES the data of the MariaDB primary node1" in dry.stdout and "dry run: nothing changed" in dry.stdout
    assert sql(live, "SELECT COUNT(*) FROM payments.payment") == str(len(expected) + len(after))

    t0 = time.monotonic()
    run = shared_lab.payctl(*argv, "--yes")
    force_s = time.monotonic() - t0
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    restored = sql(live, "SELECT payment_id FROM payments.payment ORDER BY payment_id").split()
    assert restored == expected  # exactly the payments committed before the point, on the live primary
    assert not set(after) & set(restored)
    assert f"{len(expected)} payments, last payment id {last_before}" in out
    assert "reconcile (in service): report" in out and "balanced=true" in out and "balanced=false" not in out
    kept = [d for d in _ls(f"{prefix}/data") if d.startswith("mariadb.replaced-")]
    assert kept and f"old datadir kept as {prefix}/data/{kept[-1]}" in out
    new_file = sql(live, "SHOW MASTER STATUS").split()[0]
    assert int(new_file.rsplit(".", 1)[1]) > int(old_file.rsplit(".", 1)[1])
    assert sql(live, "SELECT @@read_only") == "0"

    # the app serves new payments on the restored data, with GTIDs after every old one
    pay(5)
    assert int(sql(live, "SELECT COUNT(*) FROM payments.payment")) == len(expected) + 5
    new_seq = max(int(g.rsplit("-", 1)[1]) for g in sql(live, "SELECT @@gtid_binlog_state").split(","))
    assert new_seq > old_seq
    debit, credit = sql(live, "SELECT SUM(IF(direction = 'DEBIT', amount, 0)), "
                              "SUM(IF(direction = 'CREDIT', amount, 0)) FROM payments.ledger_entry").split()
    assert debit == credit
    audit = json.loads((shared_lab.home / "lab" / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["command"].startswith("payctl restore -i lab-1node") and audit["result"] == "ok", audit
    status = shared_lab.payctl("status", "-i", "lab-1node")
    assert status.returncode == 0, status.stdout + status.stderr
    with urllib.request.urlopen(f"{LB}/health", timeout=5) as resp:
        assert resp.status == 200
    print(f"\nlab restore --force: {force_s:.1f} s; {len(expected)} payments in service, {len(after)} after the "
          f"point gone\n$ payctl {' '.join(argv)} --yes\n{out.strip()}")


def _ls(path: str) -> list[str]:
    return sorted(subprocess.run(["ls", "-1", path], capture_output=True, text=True, check=True).stdout.split())
