"""payctl.replication against two real MariaDB servers: a replica added online while a writer commits, semi-sync,
read-only, least privilege, idempotent re-run, refusal of a non-fresh replica, and rollback of a failed attach."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from payctl import replication
from payctl.replication import DbNode, ReplicaSpec, ReplicationError
from tests.scale.conftest import SPEC, Writer
from tests.support.services import MariaDB

pytestmark = pytest.mark.slow


def test_replica_added_online_under_writes(pair: tuple[MariaDB, MariaDB, DbNode, DbNode]) -> None:
    primary, replica, p, r = pair
    steps: list[str] = []
    with Writer(lambda: primary.port, primary.root_password) as w:
        time.sleep(0.5)
        result = replication.add_replica(p, r, SPEC, steps.append)
        time.sleep(0.5)
    assert result.seeded and result.semisync_clients == 1
    assert w.failed == [] and len(w.acked) > 20, (w.failed[:3], len(w.acked))
    # Everything acknowledged on the primary is on the replica (semi-sync is on, so wait for the last one only).
    replication.wait_caught_up(p, r, 30)
    got = {int(x) for x in replica.sql("SELECT id FROM payments.payment").split()}
    assert set(w.acked) | {1, 2} <= got
    assert replica.sql("SELECT @@read_only").strip() == "1"
    st = replication.status(r)
    assert st["Using_Gtid"] == "Slave_Pos" and st["Slave_IO_Running"] == "Yes" and st["Slave_SQL_Running"] == "Yes"
    # CHANGE MASTER ran on the replica only; the primary replicates from nobody.
    assert replication.status(p) == {}
    # The replica's binlog holds only the primary's GTIDs (the seed was not logged with the replica's server_id).
    assert "-2-" not in replica.sql("SELECT @@gtid_binlog_pos")
    # Semi-sync AFTER_SYNC with the timeout, active.
    assert primary.sql("SELECT @@rpl_semi_sync_master_wait_point, @@rpl_semi_sync_master_timeout").split() == [
        "AFTER_SYNC", "2000"]  # fmt: skip
    assert replication.global_status(p, "Rpl_semi_sync_master_status")["Rpl_semi_sync_master_status"] == "ON"
    # Accounts are (re)applied on the primary after attach and replicate; the replication user may only replicate;
    # the seed user is gone.
    primary.sql(
        "CREATE USER IF NOT EXISTS app@'127.0.0.1' IDENTIFIED BY 'app-pw'; "
        "CREATE USER IF NOT EXISTS app@'10.77.0.12' IDENTIFIED BY 'app-pw'"
    )
    replication.wait_caught_up(p, r, 30)
    assert replica.sql("SELECT COUNT(*) FROM mysql.user WHERE User='app' AND Host='10.77.0.12'").strip() == "1"
    grants = primary.sql("SHOW GRANTS FOR replication@'127.0.0.1'")
    assert "GRANT REPLICATION SLAVE ON *.* TO" in grants and "SELECT" not in grants and "SUPER" not in grants
    assert primary.sql(f"SELECT COUNT(*) FROM mysql.user WHERE User='{replication.SEED_USER}'").strip() == "0"
    assert not list(Path(r.workdir).iterdir()) and not list(Path(p.workdir).iterdir())  # no secret left behind
    # A write on the primary after the fact reaches the replica.
    primary.sql("INSERT INTO payments.payment VALUES (99999, 1)")
    replication.wait_caught_up(p, r, 30)
    assert replica.sql("SELECT amount FROM payments.payment WHERE id = 99999").strip() == "1"
    state = replication.replica_state(r)
    assert state.read_only and state.source == f"127.0.0.1:{primary.port}" and state.lag_s == 0
    # payctl status's view of both nodes.
    local = r.io.run
    summary = replication.role_summary(local, "node1", "/nonexistent", "127.0.0.1", primary.port, p.client)
    assert summary == {"mariadb": f"primary, GTID {primary.sql('SELECT @@gtid_binlog_pos').strip()}",
                       "semi-sync": "ON (1 replica(s) acknowledging)"}  # fmt: skip
    summary = replication.role_summary(local, "node2", "/nonexistent", "127.0.0.1", replica.port, r.client)
    assert summary["mariadb"].startswith(f"replica of 127.0.0.1:{primary.port}, lag 0 s, GTID 0-1-")
    assert summary["mariadb"].endswith("IO Yes, SQL Yes")
    assert replication.role_summary(local, "x", "/nonexistent", "127.0.0.1") == {}  # no server: nothing claimed
    # Running it again finds the replica attached: nothing is seeded again.
    again = replication.add_replica(p, r, SPEC)
    assert not again.seeded and again.semisync_clients == 1


def test_replica_with_data_is_refused_and_nothing_changes(pair: tuple[MariaDB, MariaDB, DbNode, DbNode]) -> None:
    primary, replica, p, r = pair
    replica.sql("CREATE DATABASE payments")
    with pytest.raises(ReplicationError, match="node2 already holds database payments but replicates from nobody"):
        replication.add_replica(p, r, SPEC)
    assert primary.sql("SELECT COUNT(*) FROM mysql.user WHERE User='replication'").strip() == "0"


def test_failed_attach_rolls_back(
    pair: tuple[MariaDB, MariaDB, DbNode, DbNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary's address as the replica sees it is wrong (nothing listens there): catch-up fails within its
    deadline and every change is undone on both servers."""
    primary, replica, p, r = pair
    wrong = DbNode(p.name, p.address, p.port, p.client, p.workdir, p.io)
    spec = ReplicaSpec(SPEC.user, SPEC.password, SPEC.databases, SPEC.semisync_timeout_ms, catchup_timeout_s=3)
    primary.sql("INSERT INTO payments.payment VALUES (3, 30)")

    original = replication.change_master_sql

    def bad_port(s: ReplicaSpec, prim: DbNode) -> str:
        return original(s, DbNode(prim.name, prim.address, 1, prim.client, prim.workdir, prim.io))

    monkeypatch.setattr(replication, "change_master_sql", bad_port)
    # Writes after the snapshot are needed for catch-up to have something to wait for.
    with (
        pytest.raises(ReplicationError, match=r"did not reach GTID .* \(rolled back\)"),
        Writer(lambda: primary.port, primary.root_password, limit=200),
    ):
        replication.add_replica(wrong, r, spec)
    assert replication.status(r) == {}
    assert replica.sql("SHOW DATABASES LIKE 'payments'").strip() == ""
    assert primary.sql("SELECT COUNT(*) FROM mysql.user WHERE User IN ('replication', 'payctl_seed')").strip() == "0"
    assert primary.sql("SELECT @@rpl_semi_sync_master_enabled").strip() == "0"
