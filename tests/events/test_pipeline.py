"""The event pipeline end to end on real MariaDB, Redis and Apache Kafka: API -> outbox -> relay -> Kafka -> consumer ->
settlements, adjustments and payment.settled events -> reconciliation."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from aiokafka import AIOKafkaConsumer

from payapp import events
from tests.events.conftest import Api, Pipeline, eventually, mixed_load


def settled_as_expected(p: Pipeline) -> bool:
    """Every capture has its settlement, every refund its adjustment, and per payment Σ = captured - refunded."""
    ops = p.scalar("SELECT COUNT(*) FROM payment_operation WHERE kind IN ('CAPTURE', 'REFUND')")
    return ops == p.scalar("SELECT COUNT(*) FROM settlement")


def per_payment_mismatches(p: Pipeline) -> list[list[str]]:
    return p.sql(
        "SELECT p.payment_id FROM payment p WHERE p.captured_amount - p.refunded_amount <>"
        " (SELECT COALESCE(SUM(s.settled_amount), 0) FROM settlement s WHERE s.payment_id = p.payment_id)")


async def topic_event_ids(p: Pipeline, topics: tuple[str, ...]) -> dict[str, set[str]]:
    """Every eventId on each topic (a fresh group reading from the start)."""
    consumer = AIOKafkaConsumer(*(p.prefix + t for t in topics), bootstrap_servers=p.kafka.bootstrap,
                                group_id=f"audit-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, set[str]] = {t: set() for t in topics}
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=500)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for r in records:
                    seen[tp.topic.removeprefix(p.prefix)].add(orjson.loads(r.value or b"{}").get("eventId", "?"))
    finally:
        await consumer.stop()
    return seen


async def test_end_to_end_settles_adjusts_reconciles_and_drains_lag(pipeline: Pipeline, api: Api) -> None:
    p = pipeline
    relay = p.start("relay")
    consumer = p.start("consume")
    counts = await mixed_load(api, 16)
    await eventually(lambda: settled_as_expected(p), 60, "every capture settled and every refund adjusted")
    assert per_payment_mismatches(p) == []
    assert p.scalar("SELECT COUNT(*) FROM settlement WHERE kind = 'CAPTURE'") == counts["capture"]
    assert p.scalar("SELECT COUNT(*) FROM settlement WHERE kind = 'ADJUSTMENT'") == counts["refund"]
    # Every API event applied exactly once; nothing dead or parked.
    api_events = p.scalar("SELECT COUNT(*) FROM outbox_event WHERE topic <> 'payment.settled'")
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM processed_event") == api_events, 30, "all applied")
    assert p.scalar("SELECT COUNT(*) FROM dlq_event") == 0
    assert p.scalar("SELECT COUNT(*) FROM parked_event") == 0
    # The ledger stays balanced with the settlement postings.
    assert p.sql("SELECT SUM(IF(direction='DEBIT', amount, -amount)) FROM ledger_entry") == [["0"]]

    done = p.payapp("reconcile")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " balanced=true " in done.stdout and "mismatched=-" in done.stdout
    report_id = int(done.stdout.split()[1])
    row = p.sql(f"SELECT is_balanced, captures_checked, mismatched_payment_ids FROM reconciliation_report"
                f" WHERE report_id = {report_id}")
    assert row == [["1", str(counts["capture"]), ""]]

    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0, 30,
                     "outbox drained (settled and reconciliation events included)")
    seen = await topic_event_ids(p, events.TOPICS)
    outbox = p.sql("SELECT topic, event_id FROM outbox_event")
    for topic, event_id in outbox:
        assert event_id in seen[topic], (topic, event_id)
    assert all(seen[t] for t in events.TOPICS if t != events.DLQ), {t: len(v) for t, v in seen.items()}

    async def lag_zero() -> bool:
        lag = p.payapp("lag")
        return lag.returncode == 0 and lag.stdout.strip().endswith("total\t0")

    await eventually(lag_zero, 30, "payapp lag to reach 0", interval=1)
    relay.terminate()
    consumer.terminate()
    assert relay.wait(20) == 0 and consumer.wait(20) == 0
    assert "published" in p.log_of(relay)


async def test_lag_counts_what_no_consumer_has_read(pipeline: Pipeline, api: Api) -> None:
    """Lag is measured from the admin side: with no consumer at all it equals what the relay published."""
    p = pipeline
    relay = p.start("relay")
    for _ in range(3):
        await api.authorize(500)
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0, 30,
                     "published")
    lag = p.payapp("lag")
    assert lag.returncode == 0, lag.stderr
    assert lag.stdout.strip().endswith("total\t3"), lag.stdout
    assert "payment.authorized[0]\t3" in lag.stdout
    relay.terminate()
    relay.wait(20)


async def test_relay_metrics_export_backlog_and_lag(pipeline: Pipeline, api: Api) -> None:
    from tests.support.services import free_port

    p = pipeline
    port = free_port()
    p.start("relay", PAYAPP_RELAY_METRICS_PORT=str(port))
    await api.authorize(700)

    last = [""]

    async def scraped() -> bool:
        try:
            resp = await api.client.session.get(f"http://127.0.0.1:{port}/metrics")
            last[0] = await resp.text()
        except OSError as exc:
            last[0] = repr(exc)
            return False
        return "payapp_relay_leader 1" in last[0] and "payapp_consumer_lag_total 1" in last[0]

    try:
        await eventually(scraped, 60, "relay /metrics with leader=1 and lag 1")
    except AssertionError:
        raise AssertionError(f"last scrape:\n{last[0]}\nrelay log:\n{p.log_of(p.procs[0])[-3000:]}") from None
    await asyncio.sleep(0)


async def test_published_rows_are_purged_after_the_retention(pipeline: Pipeline, api: Api) -> None:
    p = pipeline
    for _ in range(3):
        await api.authorize(800)
    relay = p.start("relay", PAYAPP_OUTBOX_RETENTION_S="0")
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event") == 0, 30, "published rows purged")
    # Purged after publication, not instead of it.
    seen = await topic_event_ids(p, ("payment.authorized",))
    assert len(seen["payment.authorized"]) == 3
    relay.terminate()
    relay.wait(20)


async def test_an_outbox_row_with_an_unknown_topic_is_dead_lettered_not_blocking(pipeline: Pipeline, api: Api) -> None:
    # A row a newer release wrote (topic this relay does not know) sits first in the outbox, before routable rows.
    p = pipeline
    first = await api.authorize(700)
    second = await api.authorize(800)
    for pid in (first, second):  # two of them: each gets its own dead letter (dlq_event.source is unique)
        p.sql(
            "INSERT INTO outbox_event (event_id, topic, event_type, payment_id, merchant_id, `sequence`, payload,"
            " created_at) SELECT UUID(), 'payment.teleported', 'PaymentTeleported', payment_id, merchant_id, 99,"
            f" '{{}}', UTC_TIMESTAMP(6) FROM payment WHERE payment_id = {pid}"
        )
    later = [await api.authorize(900) for _ in range(2)]
    relay = p.start("relay")
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0, 30,
                     "outbox drained past the unroutable rows")  # fmt: skip
    seen = await topic_event_ids(p, ("payment.authorized",))
    assert len(seen["payment.authorized"]) == 4  # the routable rows behind them were published
    dead = p.sql("SELECT source, topic, payment_id, status, error, event_id FROM dlq_event ORDER BY dlq_id")
    teleported = [r[0] for r in p.sql("SELECT event_id FROM outbox_event WHERE topic = 'payment.teleported'"
                                      " ORDER BY id")]
    assert [d[0] for d in dead] == [f"outbox-relay:{e}" for e in teleported]
    assert [d[1:4] for d in dead] == [["payment.teleported", "NULL", "OPEN"]] * 2
    assert f"payment {first}" in dead[0][4] and f"payment {second}" in dead[1][4]
    assert all(pid > second for pid in later)
    assert p.scalar("SELECT COUNT(*) FROM dlq_event") == 2  # handled once, not again on the next round
    # This release does not know the topic either: requeueing would only dead-letter it again.
    refused = p.payapp("dlq", "requeue", "--event-id", teleported[0])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "failed\t" in refused.stdout and "does not publish topic payment.teleported either" in refused.stdout
    assert p.scalar("SELECT COUNT(*) FROM dlq_event WHERE status = 'OPEN'") == 2
    assert p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0
    relay.terminate()
    relay.wait(20)


async def test_idempotency_keys_are_purged_after_their_retention(pipeline: Pipeline, api: Api) -> None:
    p = pipeline
    for _ in range(3):
        await api.authorize(600)
    assert p.scalar("SELECT COUNT(*) FROM idempotency_key") == 3
    relay = p.start("relay", PAYAPP_IDEMPOTENCY_RETENTION_S="0")
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM idempotency_key") == 0, 30, "idempotency keys purged")
    assert p.scalar("SELECT COUNT(*) FROM payment") == 3  # the keys go, never the payments
    relay.terminate()
    relay.wait(20)
