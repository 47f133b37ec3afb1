"""Two real MariaDB servers (primary + fresh replica) on loopback, the local node seam, and a bounded writer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncmy
import pytest

from payctl.replication import DbNode, ReplicaSpec
from tests.support.services import MariaDB


class LocalIO:
    """The node seam: commands in a local bash, private files written 0600 (the servers are on this machine)."""

    def run(self, command: str) -> tuple[bool, str, str]:
        p = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        return p.returncode == 0, p.stdout, p.stderr

    def put_private(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)


def node(name: str, db: MariaDB, work: Path) -> DbNode:
    return DbNode(name, "127.0.0.1", db.port, f"mariadb --defaults-file={db.client_cnf}", str(work), LocalIO())


SPEC = ReplicaSpec(user="replication", password="repl-s3cret'pw", databases=("payments",), semisync_timeout_ms=2000,
                   catchup_timeout_s=60)  # fmt: skip


@dataclass
class Writer:
    """A bounded writer (at most `limit` rows, ~200/s at most). Each id is retried until acknowledged, against the
    port `target()` names at that moment (the test repoints it, as the deploy engine repoints the app); an id whose
    insert was refused as a duplicate had committed. Every failed attempt is recorded."""

    target: Callable[[], int]
    password: str
    limit: int = 3000
    acked: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    user: str = "root"

    def _loop(self) -> None:
        async def connect() -> asyncmy.Connection:
            return await asyncmy.connect(host="127.0.0.1", port=self.target(), user=self.user, password=self.password,
                                         db="payments", autocommit=True, connect_timeout=2)  # fmt: skip

        async def go() -> None:
            conn = None
            for i in range(self.limit):
                pid = i + 1000
                while not self.stop.is_set():
                    try:
                        if conn is None:
                            conn = await connect()
                        async with conn.cursor() as cur:
                            await cur.execute("INSERT INTO payment (id, amount) VALUES (%s, %s)", (pid, i))
                        self.acked.append(pid)
                        break
                    except Exception as exc:  # every failure is a finding
                        if "Duplicate entry" in str(exc):
                            self.acked.append(pid)
                            break
                        self.failed.append(repr(exc)[:200])
                        if conn is not None:
                            conn.close()
                            conn = None
                        await asyncio.sleep(0.05)
                if self.stop.is_set():
                    break
                await asyncio.sleep(0.005)
            if conn is not None:
                conn.close()

        asyncio.run(go())

    def __enter__(self) -> Writer:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[MariaDB, MariaDB, DbNode, DbNode]]:
    primary = MariaDB(tmp_path / "primary", server_id=1).start()
    replica = MariaDB(tmp_path / "replica", server_id=2)
    try:
        replica.start()
        primary.sql("CREATE DATABASE payments; CREATE TABLE payments.payment (id BIGINT PRIMARY KEY, amount INT)"
                    " ENGINE=InnoDB; INSERT INTO payments.payment VALUES (1, 10), (2, 20)")  # fmt: skip
        # The replica's fresh datadir is what a new node has: its own root, nothing else.
        replica.sql("RESET MASTER")
        (tmp_path / "w1").mkdir()
        (tmp_path / "w2").mkdir()
        yield primary, replica, node("node1", primary, tmp_path / "w1"), node("node2", replica, tmp_path / "w2")
    finally:
        replica.stop()
        primary.stop()
