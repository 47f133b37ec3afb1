"""Authorize as one compound statement: a failure inside it is a claim failure only when the claim failed.

The compound statement (``db.Batch.compound``) does not say which of its statements failed, so
``idempotency.is_claim_failure`` tells a refused claim from any other error by MariaDB's own answer. A duplicate
payment id is not a replay: it must surface as a database error (503 at the API), roll the whole transaction back
(no claim row left for the key) and leave the pooled connection usable. And inside the compound statement the
claim still does not wait for a claim in progress (``SET STATEMENT innodb_lock_wait_timeout = 0``): the session's
5 s lock wait would otherwise hold the request.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from payapp import db, ids
from payapp.errors import ApiError
from payapp.payments import AuthorizeRequest, Payments
from tests.app.conftest import merchant, new_database
from tests.support.services import MariaDB


async def test_a_duplicate_payment_id_is_an_error_not_a_replay(mariadb: MariaDB) -> None:
    database = new_database(mariadb, "payapp_compound")
    pool = await db.create_pool(db.DbTarget.parse(database.url), 1, 10)
    try:
        payments = Payments(pool, orjson.dumps, 10)
        m = merchant()
        first = orjson.loads((await payments.authorize(AuthorizeRequest(m, 100, "KRW", "k-1"))).body)

        # The same key again is a replay of the stored response (the claim's duplicate, inside the compound).
        again = await payments.authorize(AuthorizeRequest(m, 100, "KRW", "k-1"))
        assert again.replayed and orjson.loads(again.body) == first

        # A worker whose id block hands out an id already used (a broken sequence): payment's PRIMARY KEY refuses.
        reused = ids.payment_ids(pool)
        reused._next, reused._end = first["paymentId"], first["paymentId"] + 1
        payments._payment_ids = reused
        with pytest.raises(db.BatchError) as failed:
            await payments.authorize(AuthorizeRequest(m, 200, "KRW", "k-2"))
        assert failed.value.code == db.ER_DUP_ENTRY and "PRIMARY" in failed.value.message

        # Rolled back whole: no claim for k-2, one payment; and the connection serves the next request.
        assert database.scalar(f"SELECT COUNT(*) FROM idempotency_key WHERE merchant_id = '{m}'") == 1
        assert database.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 1
        payments._payment_ids = ids.payment_ids(pool)
        done = await payments.authorize(AuthorizeRequest(m, 200, "KRW", "k-2"))
        assert done.status == 200 and not done.replayed
        assert database.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 2
        assert database.scalar(f"SELECT COUNT(*) FROM ledger_entry l JOIN payment p USING (payment_id)"
                               f" WHERE p.merchant_id = '{m}'") == 4
    finally:
        pool.close()
        await pool.wait_closed()
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")


async def test_a_claim_in_progress_is_refused_at_once_inside_the_compound_statement(mariadb: MariaDB) -> None:
    database = new_database(mariadb, "payapp_compound")
    target = db.DbTarget.parse(database.url)
    pool = await db.create_pool(target, 1, 10)
    holder = await db.connect(target)
    try:
        m = merchant()
        await db.execute(holder, "BEGIN")  # another request's claim, not committed yet
        await db.execute(holder, "INSERT INTO idempotency_key (merchant_id, scope, idempotency_key, request_hash,"
                         " status, locked_until, created_at) VALUES (%s, 'authorize', 'k', 'h', 'IN_PROGRESS',"
                         " NOW(6), NOW(6))", m)
        payments = Payments(pool, orjson.dumps, 10)
        # Bounded below the session's innodb_lock_wait_timeout (5 s): a claim that waited would time out here.
        with pytest.raises(ApiError) as refused:
            await asyncio.wait_for(payments.authorize(AuthorizeRequest(m, 100, "KRW", "k")), 4)
        assert (refused.value.status, refused.value.code) == (409, "REQUEST_IN_PROGRESS")
        await db.execute(holder, "ROLLBACK")  # that request gives up: the key is free, the next claim takes it
        done = await payments.authorize(AuthorizeRequest(m, 100, "KRW", "k"))
        assert done.status == 200 and not done.replayed
    finally:
        holder.close()
        pool.close()
        await pool.wait_closed()
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")
