"""The consumer's rules on real MariaDB and Kafka: order independence, exactly-once effects, dead letters and
parking, replay."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from payapp import events
from payapp.consumer import APPLIED, DUPLICATE, apply_event
from payapp.events import connect, parse_event
from tests.events.conftest import Api, Pipeline, eventually, mixed_load


@asynccontextmanager
async def api_on(p: Pipeline, database: str) -> AsyncIterator[Api]:
    from payapp.app import create_app
    from payapp.migrate import migrate
    from payapp.settings import Settings

    migrate(p.mariadb.url(db=database))
    env = p.settings_env() | {"PAYAPP_DB_URL": p.mariadb.url(db=database)}
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(Settings.from_env(env))))
    await client.start_server()
    try:
        yield Api(client)
    finally:
        await client.close()


def outcome_of(p: Pipeline, database: str) -> dict[str, Any]:
    """What settlement produced, without ids that depend on timing (event ids, timestamps)."""
    def q(sql: str) -> list[list[str]]:
        return [line.split("\t") for line in p.mariadb.sql(sql, db=database).splitlines()]

    return {
        "settlements": q("SELECT payment_id, operation_id, kind, settled_amount FROM settlement"
                         " ORDER BY payment_id, operation_id, kind"),
        "accounts": q("SELECT account, SUM(IF(direction='DEBIT', amount, -amount)) FROM ledger_entry"
                      " GROUP BY account ORDER BY account"),
        "event_seq": q("SELECT payment_id, event_seq FROM payment ORDER BY payment_id"),
        "settled_events": q("SELECT payment_id, `sequence`, event_type,"
                            " JSON_VALUE(payload, '$.operationId'), JSON_VALUE(payload, '$.amount')"
                            " FROM outbox_event WHERE topic = 'payment.settled' ORDER BY payment_id, `sequence`"),
    }


async def test_shuffled_and_duplicated_delivery_gives_the_same_result(pipeline: Pipeline) -> None:
    """Two identical API histories; one applied in outbox order, the other delivered through Kafka shuffled across
    topics with every event twice. Settlements, ledger balances and settled events are identical."""
    p = pipeline
    ordered, shuffled = p.database, f"{p.database}_s"
    for database in (ordered, shuffled):
        async with api_on(p, database) as api:
            await mixed_load(api, 12, seed=3)
    try:
        rows = p.sql("SELECT topic, payload FROM outbox_event ORDER BY id")
        conn = await connect(p.db_url)
        try:
            outcomes = [await apply_event(conn, parse_event(t, v)) for t, v in rows]
            assert set(outcomes) == {APPLIED}
            assert await apply_event(conn, parse_event(*rows[0])) == DUPLICATE
        finally:
            conn.close()

        payloads = [(t, v) for t, v in (line.split("\t") for line in p.mariadb.sql(
            "SELECT topic, payload FROM outbox_event ORDER BY id", db=shuffled).splitlines())]
        deliveries = payloads * 2
        random.Random(7).shuffle(deliveries)
        producer = AIOKafkaProducer(bootstrap_servers=p.kafka.bootstrap)
        s = events.load_event_settings(environ=p.env())
        from payapp.events import ensure_topics

        await ensure_topics(s)
        await producer.start()
        try:
            for topic, value in deliveries:
                pid = orjson.loads(value)["paymentId"]
                await producer.send_and_wait(p.prefix + topic, key=str(pid).encode(), value=value.encode())
        finally:
            await producer.stop()
        consumer = p.start("consume", PAYAPP_DB_URL=p.mariadb.url(db=shuffled))
        await eventually(lambda: p.mariadb.sql("SELECT COUNT(*) FROM processed_event", db=shuffled).strip()
                         == str(len(payloads)), 60, "every event applied once")
        assert outcome_of(p, shuffled) == outcome_of(p, ordered)
        consumer.terminate()
        consumer.wait(20)
        assert f"applied {len(payloads)}, duplicates {len(payloads)}," in p.log_of(consumer)
    finally:
        p.mariadb.sql(f"DROP DATABASE IF EXISTS {shuffled}")


async def dlq_messages(p: Pipeline, want: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(p.prefix + events.DLQ, bootstrap_servers=p.kafka.bootstrap,
                                group_id=f"audit-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest")
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += [orjson.loads(r.value or b"{}") for r in records]
            if len(out) >= want:
                break
    finally:
        await consumer.stop()
    return out


async def test_poison_message_dead_letters_parks_the_payment_and_replays_in_order(
    pipeline: Pipeline, api: Api
) -> None:
    p = pipeline
    s = events.load_event_settings(environ=p.env())
    await events.ensure_topics(s)
    consumer = p.start("consume", PAYAPP_CONSUMER_MAX_ATTEMPTS="2")
    producer = AIOKafkaProducer(bootstrap_servers=p.kafka.bootstrap)
    await producer.start()
    try:
        # 1. Unparseable, keyed by a real payment: dead letter; that payment's later events are parked.
        blocked = await api.authorize(5000)
        await producer.send_and_wait(p.prefix + events.CAPTURED, key=str(blocked).encode(), value=b"{not json")
        await eventually(lambda: p.scalar("SELECT COUNT(*) FROM dlq_event") == 1, 30, "the first dead letter")
        # 2. Well-formed events of a payment missing from the primary: fails N times, dead letter, then parked.
        missing = 900_000_000
        base = {"schemaVersion": 1, "paymentId": missing, "merchantId": api.merchant, "currency": "KRW",
                "occurredAt": "2026-11-25T00:00:00.000000Z"}
        first = base | {"eventId": str(uuid.uuid4()), "type": "PaymentCaptured", "operationId": 900_000_001,
                        "amount": 3000, "sequence": 2}
        later = base | {"eventId": str(uuid.uuid4()), "type": "PaymentRefunded", "operationId": 900_000_002,
                        "amount": 1000, "sequence": 3}
        await producer.send_and_wait(p.prefix + events.CAPTURED, key=str(missing).encode(), value=orjson.dumps(first))
        await eventually(lambda: p.scalar("SELECT COUNT(*) FROM dlq_event") == 2, 30, "the second dead letter")
        await producer.send_and_wait(p.prefix + events.REFUNDED, key=str(missing).encode(), value=orjson.dumps(later))
        await api.capture(blocked, 5000)
        p.start("relay")  # now the API's events of `blocked` (authorized, captured) reach the consumer: parked
        await eventually(lambda: p.scalar("SELECT COUNT(*) FROM parked_event") == 3, 30, "three parked events")
    finally:
        await producer.stop()
    assert p.scalar("SELECT COUNT(*) FROM settlement") == 0
    dead = p.sql("SELECT payment_id, topic, attempts, LEFT(error, 60) FROM dlq_event ORDER BY dlq_id")
    assert dead[0][:3] == [str(blocked), "payment.captured", "1"] and dead[0][3].startswith("PoisonError: not JSON")
    assert dead[1][:3] == [str(missing), "payment.captured", "2"] and "not in the primary" in dead[1][3]
    on_topic = await dlq_messages(p, 2)
    assert [m["paymentId"] for m in on_topic] == [blocked, missing]
    assert on_topic[1]["eventId"] == first["eventId"] and on_topic[1]["attempts"] == 2
    listed = p.payapp("dlq", "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3, listed.stdout

    # The fix: the missing payment is restored in the primary (with its operations), then replay.
    p.sql(
        f"INSERT INTO payment (payment_id, merchant_id, amount, currency, status, captured_amount, refunded_amount,"
        f" event_seq, created_at, updated_at) VALUES ({missing}, '{api.merchant}', 3000, 'KRW',"
        f" 'PARTIALLY_REFUNDED', 3000, 1000, 3, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6));"
        f"INSERT INTO payment_operation (operation_id, payment_id, kind, amount, created_at) VALUES"
        f" (900000001, {missing}, 'CAPTURE', 3000, UTC_TIMESTAMP(6)),"
        f" (900000002, {missing}, 'REFUND', 1000, UTC_TIMESTAMP(6));")
    replayed = p.payapp("dlq", "replay", "--event-id", first["eventId"])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "ok\tapplied\tparked applied: 1" in replayed.stdout
    assert p.sql(f"SELECT kind, settled_amount FROM settlement WHERE payment_id = {missing} ORDER BY settlement_id") \
        == [["CAPTURE", "3000"], ["ADJUSTMENT", "-1000"]]
    assert p.sql(f"SELECT event_id FROM processed_event WHERE payment_id = {missing} ORDER BY `sequence`") == [
        [first["eventId"]], [later["eventId"]]]
    # The unparseable one cannot be fixed by replaying it: it stays open and its payment stays parked.
    again = p.payapp("dlq", "replay", "--all")
    assert again.returncode == 1 and "failed\tPoisonError" in again.stdout
    assert p.scalar(f"SELECT COUNT(*) FROM parked_event WHERE payment_id = {blocked}") == 2
    assert p.scalar(f"SELECT COUNT(*) FROM settlement WHERE payment_id = {blocked}") == 0
    consumer.terminate()
    consumer.wait(20)


async def test_a_read_only_primary_is_waited_for_not_dead_lettered(pipeline: Pipeline) -> None:
    """During a planned switchover the old primary is read-only for a moment: the consumer's writes fail with
    MariaDB's 1290. That is transient (retry, reconnect: the app is being repointed), never a reason to dead-letter a
    valid event; once writes are allowed the same event applies."""
    from payapp.consumer import _transient

    p = pipeline
    async with api_on(p, p.database) as api:
        await mixed_load(api, 2, seed=5)
    topic, payload = p.sql("SELECT topic, payload FROM outbox_event ORDER BY id LIMIT 1")[0]
    user, password = f"ro{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    p.mariadb.sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}';"
                  f" GRANT SELECT, INSERT, UPDATE, DELETE ON `{p.database}`.* TO '{user}'@'%'")  # fmt: skip
    conn = await connect(p.mariadb.url(user=user, password=password, db=p.database))
    try:
        p.mariadb.sql("SET GLOBAL read_only = 1")
        try:
            await apply_event(conn, parse_event(topic, payload))
        except Exception as exc:  # the point is how the consumer classifies it
            refused: BaseException | None = exc
        else:
            refused = None
        finally:
            p.mariadb.sql("SET GLOBAL read_only = 0")
        assert refused is not None and "1290" in str(refused), refused
        assert _transient(refused)
        await conn.rollback()
        assert await apply_event(conn, parse_event(topic, payload)) == APPLIED
    finally:
        conn.close()
        p.mariadb.sql(f"DROP USER '{user}'@'%'")
