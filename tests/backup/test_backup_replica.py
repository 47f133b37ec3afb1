"""A backup taken from a GTID replica (what `payctl backup` does on a two-node deployment), restored to a point in
time with the replica's own binlogs (log_slave_updates): two real MariaDB servers on loopback, writes on the primary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from payapp.migrate import migrate
from payctl import backup, replication, restore
from payctl.replication import DbNode
from tests.backup.conftest import LocalNode
from tests.backup.test_backup_restore_local import BACKUP_PW, REPO, Writer, _layout
from tests.scale.conftest import SPEC
from tests.support.services import MariaDB, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[MariaDB, MariaDB]]:
    primary = MariaDB(tmp_path / "primary", server_id=1).start()
    replica = MariaDB(tmp_path / "replica", server_id=2)
    try:
        replica.start()
        primary.sql("CREATE DATABASE payments CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        migrate(primary.url(db="payments"))
        replica.sql("RESET MASTER")
        (tmp_path / "w1").mkdir()
        (tmp_path / "w2").mkdir()
        p = DbNode("node1", "127.0.0.1", primary.port, f"mariadb --defaults-file={primary.client_cnf}",
                   str(tmp_path / "w1"), LocalNode())  # fmt: skip
        r = DbNode("node2", "127.0.0.1", replica.port, f"mariadb --defaults-file={replica.client_cnf}",
                   str(tmp_path / "w2"), LocalNode())  # fmt: skip
        replication.add_replica(p, r, SPEC)
        # the account comes from the primary through replication, as users.sql does in a deployment
        primary.sql(f"CREATE USER 'backup'@'localhost' IDENTIFIED BY '{BACKUP_PW}';"
                    f"GRANT {backup.BACKUP_GRANTS} ON *.* TO 'backup'@'localhost';")  # fmt: skip
        replication.wait_caught_up(p, r, 30)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_backup_from_the_replica_restores_to_a_point_between_two_payments(
    pair: tuple[MariaDB, MariaDB], tmp_path: Path
) -> None:
    primary, replica = pair
    node = LocalNode()
    (tmp_path / "n2").mkdir()
    source = backup.Source("node2", "replica", node, _layout(replica, tmp_path / "n2"), str(tmp_path / "n2" / "st"),
                           f"mariadb --defaults-file={replica.client_cnf}")  # fmt: skip
    writer = Writer({"host": "127.0.0.1", "port": primary.port, "user": "root", "password": primary.root_password,
                     "db": "payments", "autocommit": True}).start()
    try:
        time.sleep(1.0)
        m = backup.take(source, "test", tmp_path / "backups", datetime.now(UTC), backup.Retention(7, 0)).manifest
        time.sleep(1.0)
        writer.paused.set()
        time.sleep(0.3)
        before = list(writer.committed)
        time.sleep(1.1)
        until = datetime.now(UTC)
        time.sleep(1.1)
        writer.paused.clear()
        time.sleep(1.0)
    finally:
        writer.close()
    assert writer.committed[-1][0] > before[-1][0]
    # the replica's binlog position, with the primary's GTIDs (domain 0, server 1): the history is the primary's
    assert m.source_role == "replica" and m.gtid.startswith("0-1-"), m.gtid
    primary_gtid = primary.sql("SELECT @@gtid_binlog_pos").strip()
    assert int(m.gtid.split("-")[2]) <= int(primary_gtid.split("-")[2])
    replication.wait_caught_up(
        DbNode("node1", "127.0.0.1", primary.port, f"mariadb --defaults-file={primary.client_cnf}", "", node),
        DbNode("node2", "127.0.0.1", replica.port, f"mariadb --defaults-file={replica.client_cnf}", "", node), 30)
    newer = backup.fetch_binlogs_since(source, m, tmp_path / "newer")
    port = free_port()
    target = restore.Target(
        name="node2", io=node, workdir=str(tmp_path / "restore"), address="127.0.0.1", port=port, run_as="root",
        client=f"mariadb --defaults-file={replica.client_cnf}", payapp=str(REPO / ".venv" / "bin" / "payapp"),
        db_url=f"mysql://root:{replica.root_password}@127.0.0.1:{port}/payments",
    )  # fmt: skip
    try:
        r = restore.restore(m, tmp_path / "backups", newer, target, until)
        ok, out, err = node.run(f"{target.client} --socket={target.socket} -N -B -e "
                                "'SELECT payment_id FROM payments.payment ORDER BY payment_id'")  # fmt: skip
        assert ok, err
        assert [int(x) for x in out.split()] == [pid for pid, _ in before]
        assert r.ledger_balanced and r.reconciled is True
    finally:
        restore.discard(target)
