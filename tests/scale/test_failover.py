"""payctl.failover against two real MariaDB servers, with a bounded writer using an app account (no SUPER, so
read_only stops it) that follows the current primary as the repointed app would: a planned switchover loses nothing
and leaves the old primary replicating with MASTER_DEMOTE_TO_SLAVE=1; a forced promotion after kill -9 of the
primary keeps every acknowledged write (semi-sync AFTER_SYNC), and the old primary comes back fenced as a replica."""

from __future__ import annotations

import time

import pytest

from payctl import failover, replication
from payctl.failover import FailoverError
from payctl.replication import DbNode
from tests.scale.conftest import SPEC, Writer
from tests.support.services import MariaDB

pytestmark = pytest.mark.slow

Pair = tuple[MariaDB, MariaDB, DbNode, DbNode]


def _ids(db: MariaDB) -> set[int]:
    return {int(x) for x in db.sql("SELECT id FROM payments.payment").split()}


def _replicated_pair(pair: Pair) -> Pair:
    primary, _, p, r = pair
    replication.add_replica(p, r, SPEC)
    # The app account is made after attach, so it replicates (as the deployment's users SQL does).
    primary.sql("CREATE USER app@'127.0.0.1' IDENTIFIED BY 'app-pw'; "
                "GRANT SELECT, INSERT ON payments.* TO app@'127.0.0.1'")  # fmt: skip
    replication.wait_caught_up(p, r, 30)
    return pair


def test_planned_switchover_under_writes_loses_nothing(pair: Pair) -> None:
    primary, replica, p, r = _replicated_pair(pair)
    current = {"port": primary.port}
    with Writer(lambda: current["port"], "app-pw", user="app") as w:
        time.sleep(1)
        acked_before = len(w.acked)
        result = failover.switchover(p, r, SPEC)
        current["port"] = replica.port  # the deploy engine repoints the app at the live primary
        time.sleep(1.5)
    assert result.new_primary == "node2" and result.fenced
    assert acked_before > 20 and len(w.acked) > acked_before + 20, (acked_before, len(w.acked))
    # Writes during the freeze failed fast as read-only, and were retried on the new primary.
    assert all("read-only" in f or "1290" in f for f in w.failed), w.failed[:3]
    assert set(w.acked) | {1, 2} <= _ids(replica)
    # The old primary is a replica of the new one (GTID, demoted), read-only, and has everything.
    st = replication.status(p)
    assert st["Master_Port"] == str(replica.port) and st["Using_Gtid"] == "Slave_Pos"
    assert st["Slave_IO_Running"] == "Yes" and st["Slave_SQL_Running"] == "Yes"
    replication.wait_caught_up(r, p, 30)
    assert set(w.acked) <= _ids(primary)
    assert primary.sql("SELECT @@read_only").strip() == "1" and replica.sql("SELECT @@read_only").strip() == "0"
    assert replication.status(r) == {}
    assert replication.global_status(r, "Rpl_semi_sync_master_status")["Rpl_semi_sync_master_status"] == "ON"
    # And back again: a second switchover returns the roles (the GTID history is one line).
    back = failover.switchover(r, p, SPEC)
    assert back.new_primary == "node1" and primary.sql("SELECT @@read_only").strip() == "0"


def test_switchover_refuses_a_node_that_is_not_its_replica(pair: Pair) -> None:
    primary, _, p, r = pair
    with pytest.raises(FailoverError, match="node2 does not replicate from node1"):
        failover.switchover(p, r, SPEC)
    assert primary.sql("SELECT @@read_only").strip() == "0"


def test_forced_promotion_after_kill_keeps_every_acknowledged_write(pair: Pair) -> None:
    primary, replica, p, r = _replicated_pair(pair)
    current = {"port": primary.port}
    with Writer(lambda: current["port"], "app-pw", user="app") as w:
        time.sleep(1.5)
        primary.kill()  # kill -9 of the primary under load
        acked_at_kill = set(w.acked)
        result = failover.promote([r], None, SPEC)
        current["port"] = replica.port
        time.sleep(1.5)
    assert result.new_primary == "node2" and not result.fenced and result.lost_gtids == ""
    assert len(acked_at_kill) > 20
    assert acked_at_kill <= _ids(replica), sorted(acked_at_kill - _ids(replica))[:10]
    assert set(w.acked) <= _ids(replica)
    assert replica.sql("SELECT @@read_only").strip() == "0" and replication.status(r) == {}
    # The old primary comes back: fenced (read-only) and made a replica of the new primary.
    primary.start()
    try:
        failover.fence(p, r, SPEC)
    except FailoverError as exc:
        # The kill landed between a commit's binlog write and the replica's ack (AFTER_SYNC): the old primary holds
        # a transaction no client saw acknowledged, the new one never had it. fence() refuses to keep it, naming the
        # way out; what must hold is that no acknowledged write is among those extra rows.
        assert "1236" in exc.message and "reseed" in (exc.hint or ""), (exc.message, exc.hint)
        assert primary.sql("SELECT @@read_only").strip() == "1"
        assert not (_ids(primary) - _ids(replica)) & set(w.acked)
        pytest.skip("the kill left an unacknowledged commit on the old primary (checked: none acknowledged); "
                    "re-attach path not exercised this run")  # fmt: skip
    assert primary.sql("SELECT @@read_only").strip() == "1"
    replica.sql("INSERT INTO payments.payment VALUES (777777, 7)")
    replication.wait_caught_up(r, p, 30)
    assert 777777 in _ids(primary)
