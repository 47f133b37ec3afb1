"""Backup under writes and point-in-time restore against a real MariaDB (binlog + GTID) on loopback, no lab.

The node is this machine (``LocalNode``): the same node script, the same mariabackup, mariadb-binlog and payapp the
lab runs. Payments are written by a bounded writer; the restore goes to a point between two known payments.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncmy
import pytest

from payapp.migrate import available, migrate
from payctl import backup, restore
from tests.backup.conftest import LocalNode
from tests.support.services import MariaDB, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BACKUP_PW = "backup-test-pw"


@dataclass
class Writer:
    """Writes payments (payment, AUTHORIZE operation, two balanced ledger rows) in one transaction each; bounded."""

    url: dict[str, object]
    committed: list[tuple[int, float]] = field(default_factory=list)  # (payment_id, time after COMMIT)
    paused: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    limit: int = 3000
    thread: threading.Thread | None = None

    def start(self) -> Writer:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        return self

    async def _run(self) -> None:
        conn = await asyncmy.connect(**self.url)  # type: ignore[arg-type]
        try:
            while not self.stop.is_set() and len(self.committed) < self.limit:
                if self.paused.is_set():
                    await asyncio.sleep(0.02)
                    continue
                now = datetime.now(UTC).replace(tzinfo=None)
                async with conn.cursor() as cur:
                    await cur.execute("BEGIN")
                    await cur.execute("INSERT INTO payment (merchant_id, amount, currency, status, created_at, "
                                      "updated_at) VALUES ('m1', 1000, 'KRW', 'REQUESTED', %s, %s)", (now, now))
                    pid = cur.lastrowid
                    await cur.execute("INSERT INTO payment_operation (payment_id, kind, amount, created_at) "
                                      "VALUES (%s, 'AUTHORIZE', 1000, %s)", (pid, now))
                    op = cur.lastrowid
                    for account, direction in (("customer", "DEBIT"), ("merchant_pending", "CREDIT")):
                        await cur.execute("INSERT INTO ledger_entry (payment_id, operation_id, account, direction, "
                                          "amount, currency, created_at) VALUES (%s, %s, %s, %s, 1000, 'KRW', %s)",
                                          (pid, op, account, direction, now))
                    await cur.execute("COMMIT")
                self.committed.append((int(pid), time.time()))
                await asyncio.sleep(0.02)
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    db = MariaDB(tmp_path_factory.mktemp("backup-src"), server_id=7).start()
    db.sql("CREATE DATABASE payments CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"
           f"CREATE USER 'backup'@'localhost' IDENTIFIED BY '{BACKUP_PW}';"
           f"GRANT {backup.BACKUP_GRANTS} ON *.* TO 'backup'@'localhost';")
    migrate(db.url(db="payments"))
    try:
        yield db
    finally:
        db.stop()


def _layout(db: MariaDB, base: Path) -> backup.NodeLayout:
    cnf = base / "backup.cnf"
    auth = f"user=backup\npassword={BACKUP_PW}\nsocket={db.socket_path}\n"
    cnf.write_text(f"[client]\n{auth}[mariabackup]\n{auth}datadir={db.datadir}\n")
    cnf.chmod(0o600)
    return backup.NodeLayout(cnf=str(cnf), lock=str(base / "backup.lock"))


def test_backup_under_writes_then_restore_to_a_point_between_two_payments(server: MariaDB, tmp_path: Path) -> None:
    node = LocalNode()
    (tmp_path / "node").mkdir()
    source = backup.Source("local", "primary", node, _layout(server, tmp_path / "node"),
                           str(tmp_path / "node" / "staging"), f"mariadb --defaults-file={server.client_cnf}")
    store = tmp_path / "backups"
    writer = Writer({"host": "127.0.0.1", "port": server.port, "user": "root", "password": server.root_password,
                     "db": "payments", "autocommit": True}).start()
    try:
        time.sleep(1.0)
        taken = backup.take(source, "test", store, datetime.now(UTC), backup.Retention(7, 0))
        m = taken.manifest
        assert len(writer.committed) > 10
        # keep writing after the backup, then a gap with the restore point in its middle, then more payments
        time.sleep(1.5)
        writer.paused.set()
        time.sleep(0.2)
        before = list(writer.committed)
        time.sleep(1.1)
        until = datetime.now(UTC)
        time.sleep(1.1)
        writer.paused.clear()
        time.sleep(1.0)
    finally:
        writer.close()
    after = [pid for pid, _ in writer.committed if pid > before[-1][0]]
    assert after, "the writer kept writing after the restore point"

    # the manifest: position, binlogs and checksums, all files on disk
    assert backup.GTID_RE.match(m.gtid) and m.binlogs and m.binlogs[0] == m.binlog_file
    assert {f.name for f in m.files} == {backup.BASE, *(f"binlogs/{b}" for b in m.binlogs)}
    assert m.schema_version == str(available()[-1].version) and m.mariadb_version.startswith("10.11")
    backup.verify(store, m)
    assert not any("missing required privilege" in line
                   for line in (tmp_path / "node").rglob("mariabackup.log") for line in [line.read_text()])

    newer = backup.fetch_binlogs_since(source, m, tmp_path / "newer")
    assert newer, "binlogs were written after the backup"
    port = free_port()
    target = restore.Target(
        name="local", io=node, workdir=str(tmp_path / "restore" / m.id), address="127.0.0.1", port=port,
        run_as="root", client=f"mariadb --defaults-file={server.client_cnf}",
        payapp=str(REPO / ".venv" / "bin" / "payapp"),
        db_url=f"mysql://root:{server.root_password}@127.0.0.1:{port}/payments", reconcile_tz="Asia/Seoul",
    )
    (tmp_path / "restore").mkdir()
    try:
        r = restore.restore(m, store, newer, target, until)
        ids = [int(x) for x in _sql(target, "SELECT payment_id FROM payments.payment ORDER BY payment_id").split()]
        assert ids == [pid for pid, _ in before]  # exactly the payments committed before the restore point
        assert r.payments == len(before) and r.last_payment_id == before[-1][0]
        assert r.ledger_balanced and r.total_debit == 1000 * len(before) * 1
        assert r.reconciled is True and r.reconcile and "balanced=true" in r.reconcile[-1]
        assert f"debit={1000 * len(before)} credit={1000 * len(before)} payments={len(before)} " in r.reconcile[-1]
        assert r.transactions > 0 and r.last_gtid
        # the same place is busy now: a clear refusal, nothing touched
        with pytest.raises(backup.BackupError, match="already runs there"):
            restore.check_target(target)
    finally:
        assert restore.discard(target)
    assert not Path(target.workdir).exists()


def _sql(t: restore.Target, query: str) -> str:
    ok, out, err = t.io.run(f"{t.client} --socket={t.socket} -N -B -e \"{query}\"")
    assert ok, err
    return out


def test_checksum_mismatch_and_unknown_id_and_until_before_the_end(server: MariaDB, tmp_path: Path) -> None:
    node = LocalNode()
    (tmp_path / "node").mkdir()
    source = backup.Source("local", "primary", node, _layout(server, tmp_path / "node"),
                           str(tmp_path / "node" / "staging"), f"mariadb --defaults-file={server.client_cnf}")
    store = tmp_path / "backups"
    m = backup.take(source, "test", store, datetime.now(UTC), backup.Retention(7, 0)).manifest
    with pytest.raises(backup.BackupError, match="no backup '20990101T000000Z'") as unknown:
        backup.load(store, "20990101T000000Z")
    assert m.id in unknown.value.hint
    with pytest.raises(backup.BackupError, match="is before the end of backup"):
        restore.check_until(m, backup.parse_until("2020-01-01T00:00:00Z"))
    damaged = store / m.id / f"binlogs/{m.binlogs[0]}"
    with damaged.open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(backup.BackupError, match=f"checksum mismatch in binlogs/{m.binlogs[0]}"):
        backup.verify(store, m)
