"""PAYAPP_DB_QUERY_TIMEOUT_MS: a request that got a connection but no answer from MariaDB in time gets 503 +
Retry-After, the connection is closed (not pooled), and a retry with the same idempotency key never doubles anything.

The slow test is the case that found it: MariaDB's binlog on a full disk (a 128 KiB tmpfs this test mounts; the
next binlog file is a symlink onto it). MariaDB then accepts connections and reads, but every commit waits for space
("Waiting for someone to free space", retried every 60 s). Before the bound, the requests holding the pool's
connections hung until MariaDB resumed, and once the worker's payment-id block ran out (ids come from a NEXTVAL,
which must commit too) every authorize queued behind the reservation's lock: the drill saw no answer at all for 30 s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from payapp import db
from payapp.keys import DB_POOL
from payapp.settings import Settings
from tests.app.conftest import AppDatabase, app_client, make_env, merchant, new_database
from tests.app.test_api import assert_error, authorize, call
from tests.support.services import MariaDB, Redis


async def test_a_statement_past_the_query_timeout_is_503_and_its_connection_is_dropped(
    app_db: AppDatabase, redis_server: Redis
) -> None:
    env = make_env(app_db.url, redis_server.url(), DB_POOL_SIZE=2, DB_QUERY_TIMEOUT_MS=800)
    async with app_client(Settings.from_env(env)) as client:
        m = merchant()
        paid = await authorize(client, m, 5_000, key="a")
        pool: db.Pool = client.app[DB_POOL]
        assert pool.query_timeout == 0.8
        # Another session holds the payment's row lock: capture's SELECT ... FOR UPDATE waits (lock wait: 5 s).
        holder = await db.connect(db.DbTarget.parse(app_db.url))
        try:
            await db.execute(holder, "BEGIN")
            await db.execute(holder, "SELECT 1 FROM payment WHERE payment_id = %s FOR UPDATE", paid["paymentId"])
            start = time.monotonic()
            status, body, headers = await call(client, "POST", f"/payments/capture/{paid['paymentId']}",
                                               {"merchantId": m}, headers={"Idempotency-Key": "c"})  # fmt: skip
            waited = time.monotonic() - start
            assert_error(status, body, 503, "SERVICE_UNAVAILABLE")
            assert headers["Retry-After"] == "1"
            assert 0.7 < waited < 3  # the bound, not the 5 s lock wait
            assert pool.size - pool.freesize == 0  # nothing is left checked out
            await db.execute(holder, "ROLLBACK")
        finally:
            holder.close()
        # The dropped connection's transaction is gone with it: the retry does the capture, once.
        status, body, _ = await call(client, "POST", f"/payments/capture/{paid['paymentId']}", {"merchantId": m},
                                     headers={"Idempotency-Key": "c"})  # fmt: skip
        assert status == 200 and body["capturedAmount"] == 5_000, body
        assert app_db.scalar(f"SELECT COUNT(*) FROM payment_operation WHERE payment_id = {paid['paymentId']}"
                             " AND kind = 'CAPTURE'") == 1  # fmt: skip


def test_default_bound_is_4_s(app_db: AppDatabase, redis_server: Redis) -> None:
    assert Settings.from_env(make_env(app_db.url, redis_server.url())).db_query_timeout_ms == 4000
    assert Settings.from_env(make_env(app_db.url, redis_server.url(), DB_QUERY_TIMEOUT_MS=0)).db_query_timeout_ms == 0


# ------------------------------------------------------------------------------------------- a full binlog disk


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.slow
async def test_a_full_binlog_disk_gives_503_never_a_hang_and_nothing_doubles_after_it_resumes(
    tmp_path: Path, redis_server: Redis
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root (CI runs as root)")
    server = MariaDB(tmp_path / "mariadb").start()
    small = tmp_path / "small"
    small.mkdir()
    mounted = False
    filler: threading.Thread | None = None
    try:
        database = new_database(server, "diskfull")
        server.sql("CREATE TABLE ballast (id INT AUTO_INCREMENT PRIMARY KEY, v MEDIUMTEXT)", db=database.name)
        env = make_env(database.url, redis_server.url(), DB_POOL_SIZE=2, DB_POOL_TIMEOUT_MS=300,
                       DB_QUERY_TIMEOUT_MS=1500)  # fmt: skip
        async with app_client(Settings.from_env(env)) as warm:
            await authorize(warm, merchant(), 1_000, key="warm")
        current = server.sql("SHOW MASTER STATUS").split()[0]
        stem, number = current.rsplit(".", 1)
        following = f"{stem}.{int(number) + 1:0{len(number)}d}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700", "payctl-test-diskfull", str(small)],
                       check=True)  # fmt: skip
        mounted = True
        (server.datadir.parent / following).symlink_to(small / following)  # log_bin is <base>/binlog
        server.sql("FLUSH BINARY LOGS")
        assert (small / following).stat().st_size > 0  # MariaDB writes its binlog onto the tmpfs now

        def fill() -> None:  # the last insert waits for space until the test grows the tmpfs
            for _ in range(100):
                if _free(small) == 0:
                    return
                try:
                    server.sql("INSERT INTO ballast (v) VALUES (REPEAT('x', 16384))", db=database.name)
                except (RuntimeError, subprocess.TimeoutExpired):
                    return

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        deadline = time.monotonic() + 30
        while _free(small) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert _free(small) == 0, "the binlog tmpfs did not fill"

        # A fresh worker: its first authorize must reserve an id block (NEXTVAL, which cannot commit now).
        m = merchant()
        async with app_client(Settings.from_env(env)) as client:
            start = time.monotonic()

            async def one(i: int) -> tuple[int, str, float]:
                status, body, _ = await call(client, "POST", "/payments/authorize", _payment(m, i))
                return status, str(body.get("code")), time.monotonic() - start

            answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6))), 20)
            assert {(s, c) for s, c, _ in answers} == {(503, "SERVICE_UNAVAILABLE")}, answers
            assert max(t for _, _, t in answers) < 4, answers  # bounded: 1.5 s query timeout (+ pool wait)
            # A worker that has its block: the requests that get a connection wait at COMMIT, then 503.
            later = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6, 12))), 20)
            assert {s for s, _, _ in later} == {503}, later
            assert app_db_count(server, database.name, m) == 0  # nothing visible while the commits wait

            subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)  # space again
            # MariaDB retries a full disk every 60 s: wait for the commits to go through.
            resumed = time.monotonic()
            server.sql("FLUSH BINARY LOGS")  # takes the binlog lock: returns once the waiting writer wrote
            assert time.monotonic() - resumed < 70
            # Every key retried: 200 exactly once per key, whether its first commit landed late or never did.
            for i in range(12):
                status, body, _ = await call(client, "POST", "/payments/authorize", _payment(m, i))
                assert status == 200 and body["amount"] == 1_000 + i, body
        assert app_db_count(server, database.name, m) == 12
        rows = server.sql("SELECT p.payment_id FROM payment p JOIN ledger_entry l ON l.payment_id = p.payment_id"
                          f" WHERE p.merchant_id = '{m}' GROUP BY p.payment_id"
                          " HAVING SUM(IF(l.direction = 'DEBIT', l.amount, 0))"
                          " <> SUM(IF(l.direction = 'CREDIT', l.amount, 0))", db=database.name)  # fmt: skip
        assert rows.strip() == ""  # every ledger balanced
    finally:
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=False)
        if filler is not None:
            filler.join(90)
        server.stop()
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
        server.remove()


def _payment(m: str, i: int) -> dict[str, object]:
    return {"merchantId": m, "amount": 1_000 + i, "currency": "KRW", "idempotencyKey": f"full-{i}"}


def app_db_count(server: MariaDB, name: str, m: str) -> int:
    return int(AppDatabase(server, name).scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'"))
