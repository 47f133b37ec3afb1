"""``payapp consume``: the settlement worker. Kafka group, one MariaDB transaction per polled batch, offsets after it.

Per polled batch, one transaction in the primary (``apply_batch``; what it cannot decide goes through
``apply_event``, one transaction per event). Per event: lock the payment row, skip it when its eventId is in
``processed_event`` (a redelivery), park it when the payment has an OPEN dead letter (later events wait behind
the poison one), otherwise record the eventId and bring the payment's settlements up to date
(``payapp.settlement``: computed from committed state, so order and duplicates do not matter). Offsets are
committed to Kafka only after the transactions of everything before them committed: a crash anywhere redelivers,
and the eventId makes the redelivery a no-op.

A message that cannot be parsed, or fails ``CONSUMER_MAX_ATTEMPTS`` times, becomes a dead letter: a
``dlq_event`` row (OPEN) and a message on ``payment.dlq``. Connection losses and lock timeouts are not counted as
failures: they are retried until the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncmy
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from payapp import db, settlement
from payapp.db import Batch, rollback_quietly, utcnow
from payapp.events import (
    CONSUMED,
    DLQ,
    Event,
    EventSettings,
    PoisonError,
    Stopped,
    bounded,
    connect,
    consumer,
    ensure_topics,
    key_payment_id,
    parse_event,
    producer,
    sleep_until,
    wait_or_stop,
)

log = logging.getLogger("payapp.consumer")

APPLIED, DUPLICATE, PARKED = "applied", "duplicate", "parked"
COMMIT_EVERY_S = 0.5
COMMIT_TIMEOUT_S = 10.0
STOP_STEP_S = 5.0  # each shutdown step (last commit, consumer stop, producer stop): 15 s in all, under the 30 s kill
# A read-only primary is a switchover under way: wait for the repoint, never dead-letter a valid event over it.
_TRANSIENT = (db.ER_LOCK_WAIT_TIMEOUT, db.ER_LOCK_DEADLOCK, db.ER_OPTION_PREVENTS_STATEMENT)


class Transient(Exception):
    """The database is unreachable or a lock timed out: retry without counting it against the message."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, db.BatchError):
        return exc.code in _TRANSIENT
    code = db.error_code(exc)
    return isinstance(exc, (OSError, asyncmy.errors.OperationalError, asyncmy.errors.InterfaceError)) and (
        code is None or code >= 2000 or code in _TRANSIENT
    )


async def apply_event(conn: asyncmy.Connection, event: Event, *, resolve: int | None = None) -> str:
    """Apply one event in its own transaction; returns applied, duplicate or parked.

    ``resolve`` (``payapp dlq replay``): the id of the OPEN dead letter this event is; it does not park the event
    and is marked RESOLVED in the same transaction (so the consumer, serialised on the payment row, never parks an
    event behind a dead letter that is already fixed)."""
    mark = "UPDATE dlq_event SET status = 'RESOLVED', resolved_at = UTC_TIMESTAMP(6) WHERE dlq_id = %s"
    pid = event.payment_id
    first = Batch()
    first.add("BEGIN")
    i_lock = first.add(settlement.LOCK_PAYMENT, pid)
    i_seen = first.add("SELECT 1 FROM processed_event WHERE event_id = %s", event.event_id)
    i_dlq = first.add("SELECT COUNT(*) FROM dlq_event WHERE payment_id = %s AND status = 'OPEN'", pid)
    i_ops = first.add(settlement.UNSETTLED_OPERATIONS, pid)
    try:
        res = await first.run(conn)
        payment = settlement.locked(pid, res[i_lock].rows)
        if res[i_seen].rows:
            if resolve is not None:
                await db.execute(conn, mark + "; COMMIT", resolve)
            else:
                await db.execute(conn, "ROLLBACK")
            return DUPLICATE
        if int(res[i_dlq].rows[0][0]) > (0 if resolve is None else 1):
            await db.execute(
                conn,
                "INSERT IGNORE INTO parked_event (event_id, payment_id, topic, `sequence`, payload, parked_at)"
                " VALUES (%s, %s, %s, %s, %s, %s); COMMIT",
                event.event_id, pid, event.topic, event.sequence, event.raw, utcnow(),
            )
            return PARKED
        if payment is None:
            raise LookupError(f"payment {pid} is not in the primary")
        if payment.merchant_id != event.merchant_id:
            raise PoisonError(f"merchantId {event.merchant_id!r} is not the payment's merchant")
        now = utcnow()
        second = Batch()
        second.add(
            "INSERT INTO processed_event (event_id, payment_id, topic, `sequence`, processed_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            event.event_id, pid, event.topic, event.sequence, now,
        )
        settlement.stage(second, payment, res[i_ops].rows, event.event_id, now)
        if resolve is not None:
            second.add(mark, resolve)
        second.add("COMMIT")
        await second.run(conn)
        return APPLIED
    except BaseException:
        await rollback_quietly(conn)
        raise


def _in(n: int) -> str:
    return ",".join(["%s"] * n)


async def apply_batch(conn: asyncmy.Connection, batch: list[Event]) -> dict[str, str]:
    """Apply many events in ONE transaction (one commit, one fsync); returns {eventId: outcome}.

    Same rules as ``apply_event``. Events it cannot decide (payment missing in the primary, wrong merchant) are left
    out of the result for the caller to handle one by one (retries, dead letter). Payment rows are locked (in id
    order, so two consumers cannot deadlock) only where there is something to settle or a dead letter to park
    behind; an event of a payment with nothing unsettled only records its eventId.
    """
    if not batch:
        return {}
    pids = sorted({e.payment_id for e in batch})
    ids = list({e.event_id for e in batch})
    first = Batch()
    first.add("BEGIN")
    i_pay = first.add(f"SELECT payment_id, merchant_id FROM payment WHERE payment_id IN ({_in(len(pids))})", *pids)
    i_seen = first.add(f"SELECT event_id FROM processed_event WHERE event_id IN ({_in(len(ids))})", *ids)
    i_dlq = first.add(f"SELECT DISTINCT payment_id FROM dlq_event WHERE payment_id IN ({_in(len(pids))})"
                      " AND status = 'OPEN'", *pids)
    i_ops = first.add(f"SELECT DISTINCT o.payment_id FROM ({settlement.unsettled_operations_in(len(pids))}) o", *pids)
    try:
        res = await first.run(conn)
        merchants = {int(r[0]): r[1] for r in res[i_pay].rows}
        seen = {r[0] for r in res[i_seen].rows}
        lock = sorted({int(r[0]) for r in res[i_dlq].rows} | {int(r[0]) for r in res[i_ops].rows})
        locked: dict[int, settlement.Locked] = {}
        blocked: set[int] = set()
        unsettled: dict[int, list[tuple[object, ...]]] = {}
        if lock:
            second = Batch()
            i_lock = second.add(
                f"SELECT payment_id, merchant_id, currency, event_seq FROM payment WHERE payment_id IN"
                f" ({_in(len(lock))}) ORDER BY payment_id FOR UPDATE", *lock)
            i_dlq2 = second.add(f"SELECT DISTINCT payment_id FROM dlq_event WHERE payment_id IN ({_in(len(lock))})"
                                " AND status = 'OPEN'", *lock)
            i_ops2 = second.add(settlement.unsettled_operations_in(len(lock)), *lock)
            res2 = await second.run(conn)
            locked = {int(r[0]): settlement.Locked(int(r[0]), r[1], r[2], int(r[3])) for r in res2[i_lock].rows}
            blocked = {int(r[0]) for r in res2[i_dlq2].rows}
            for r in res2[i_ops2].rows:
                unsettled.setdefault(int(r[0]), []).append(tuple(r[1:]))
        now = utcnow()
        out: dict[str, str] = {}
        third = Batch()
        processed: list[object] = []
        parked: list[object] = []
        triggers: dict[int, str] = {}
        for e in batch:
            if e.event_id in out:
                continue
            if e.event_id in seen:
                out[e.event_id] = DUPLICATE
            elif e.payment_id in blocked:
                out[e.event_id] = PARKED
                parked += [e.event_id, e.payment_id, e.topic, e.sequence, e.raw, now]
            elif merchants.get(e.payment_id) != e.merchant_id:
                continue  # missing payment or wrong merchant: the one-by-one path decides (retry, dead letter)
            else:
                out[e.event_id] = APPLIED
                processed += [e.event_id, e.payment_id, e.topic, e.sequence, now]
                triggers.setdefault(e.payment_id, e.event_id)
        if processed:
            third.add("INSERT INTO processed_event (event_id, payment_id, topic, `sequence`, processed_at) VALUES "
                      + ", ".join(["(%s, %s, %s, %s, %s)"] * (len(processed) // 5)), *processed)
        if parked:
            third.add("INSERT IGNORE INTO parked_event (event_id, payment_id, topic, `sequence`, payload, parked_at)"
                      " VALUES " + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * (len(parked) // 6)), *parked)
        for pid, trigger in triggers.items():
            if pid in locked and pid in unsettled:
                settlement.stage(third, locked[pid], tuple(unsettled[pid]), trigger, now)
        third.add("COMMIT")
        await third.run(conn)
        return out
    except BaseException:
        await rollback_quietly(conn)
        raise


async def record_dead_letter(
    conn: asyncmy.Connection, source: str, topic: str, payment_id: int | None, event: Event | None, raw: str,
    error: str, attempts: int,
) -> bool:
    """Store an OPEN dead letter (once per source message); True when it is new."""
    res = await db.execute(
        conn,
        "INSERT IGNORE INTO dlq_event (source, event_id, payment_id, topic, `sequence`, payload, error, attempts,"
        " status, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'OPEN', %s)",
        source, event.event_id if event else None, payment_id, topic, event.sequence if event else None, raw,
        error[:4000], attempts, utcnow(),
    )
    return res.rowcount == 1


def dead_letter_message(source: str, topic: str, payment_id: int | None, event: Event | None, raw: str,
                        error: str, attempts: int) -> bytes:
    return orjson.dumps({
        "source": source, "topic": topic, "paymentId": payment_id, "eventId": event.event_id if event else None,
        "sequence": event.sequence if event else None, "error": error, "attempts": attempts, "payload": raw,
        "deadAt": db.iso(utcnow()),
    })


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    dead: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


class Worker:
    """The consume loop: getmany → one transaction for the batch (one by one for what it cannot decide) → commit
    offsets → repeat."""

    def __init__(self, db_url: str, settings: EventSettings) -> None:
        self.db_url = db_url
        self.s = settings
        self.stats = ConsumerStats()
        self._conn: asyncmy.Connection | None = None
        self._producer: AIOKafkaProducer | None = None

    async def _db(self) -> asyncmy.Connection:
        if self._conn is None:
            self._conn = await connect(self.db_url)
        return self._conn

    def _drop_db(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await ensure_topics(self.s)
                break
            except (KafkaError, OSError) as exc:
                log.warning("consume: brokers not ready (%s); retrying", exc)
                await sleep_until(stop, 2.0)
        kafka = consumer(self.s, *CONSUMED)
        await kafka.start()
        self._producer = producer(self.s)
        await self._producer.start()
        pending: dict[TopicPartition, OffsetAndMetadata] = {}
        committed_at = 0.0
        try:
            while not stop.is_set():
                batch = await kafka.getmany(timeout_ms=200, max_records=500)
                if batch:
                    await self.handle_many([r for records in batch.values() for r in records])
                    pending.update({tp: OffsetAndMetadata(records[-1].offset + 1, "")
                                    for tp, records in batch.items()})
                # Offsets go to Kafka at most every COMMIT_EVERY_S (and when idle): each commit is a broker request,
                # and a crash in between only redelivers what the eventIds already make no-ops.
                if pending and (not batch or time.monotonic() - committed_at >= COMMIT_EVERY_S):
                    committed_at = time.monotonic()
                    await self._commit(kafka, pending, stop)
            if pending:
                await bounded("consume: last offset commit", self._commit(kafka, pending), STOP_STEP_S, log)
        finally:
            # Each step bounded: with the broker unreachable they wait for it (or raise CancelledError, aiokafka's
            # fetcher), and supervisord kills a consumer that has not exited after 30 s. Offsets not committed only
            # redeliver what the eventIds make no-ops.
            await bounded("consume: consumer stop", kafka.stop(), STOP_STEP_S, log)
            await bounded("consume: producer stop", self._producer.stop(), STOP_STEP_S, log)
            self._drop_db()

    @staticmethod
    async def _commit(kafka: AIOKafkaConsumer, pending: dict[TopicPartition, OffsetAndMetadata],
                      stop: asyncio.Event | None = None) -> None:  # fmt: skip
        """Commit ``pending`` (cleared). With the coordinator gone aiokafka retries a commit until it is back, so
        ``stop`` (SIGTERM) or COMMIT_TIMEOUT_S ends the wait: the records are redelivered, and are no-ops."""
        offsets = dict(pending)
        pending.clear()
        try:
            if stop is None:
                await kafka.commit(offsets)
            else:
                await wait_or_stop(kafka.commit(offsets), stop, COMMIT_TIMEOUT_S)
        except (Stopped, TimeoutError):
            log.warning("consume: offset commit not acknowledged (broker unreachable?); records will be redelivered")
        except KafkaError as exc:
            # A rebalance or a broker outage: the records come again (to us or another member) and their eventIds
            # make them no-ops.
            log.warning("consume: offset commit failed (%s); records will be redelivered", exc)

    async def handle_many(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Apply a polled batch in one transaction; what it cannot decide (or any error) goes one by one."""
        parsed: list[tuple[ConsumerRecord[bytes, bytes], Event]] = []
        single: list[ConsumerRecord[bytes, bytes]] = []
        for record in records:
            try:
                parsed.append((record, parse_event(self.s.logical(record.topic), record.value)))
            except PoisonError:
                single.append(record)
        try:
            outcomes = await apply_batch(await self._db(), [e for _, e in parsed])
        except Exception as exc:
            if _transient(exc):
                self._drop_db()
            log.info("consume: batch of %d fell back to one by one: %s", len(parsed), exc)
            outcomes = {}
        counted: set[str] = set()
        for record, event in parsed:
            if event.event_id not in outcomes:
                single.append(record)
            elif event.event_id not in counted:
                counted.add(event.event_id)
                self._count(outcomes[event.event_id], event.topic)
            else:
                self._count(DUPLICATE, event.topic)
        for record in sorted(single, key=lambda r: (r.topic, r.partition, r.offset)):
            await self.handle(record)

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> str:
        """Apply one record, retrying failures up to the limit, then dead-lettering it."""
        topic = self.s.logical(record.topic)
        source = f"{topic}:{record.partition}:{record.offset}"
        raw = (record.value or b"").decode(errors="replace")
        event: Event | None = None
        attempts = 0
        while True:
            try:
                if event is None:
                    event = parse_event(topic, record.value)
                outcome = await apply_event(await self._db(), event)
                self._count(outcome, topic)
                return outcome
            except Exception as exc:
                if _transient(exc):
                    log.warning("consume: transient database error (%s); retrying", exc)
                    self._drop_db()
                    await asyncio.sleep(0.5)
                    continue
                attempts += 1
                if not isinstance(exc, PoisonError) and attempts < self.s.consumer_max_attempts:
                    await asyncio.sleep(0.1 * attempts)
                    continue
                error = f"{type(exc).__name__}: {exc}"
                pid = event.payment_id if event else key_payment_id(record.key)
                await self._dead_letter(source, topic, pid, event, raw, error, attempts)
                return "dead"

    async def _dead_letter(self, source: str, topic: str, pid: int | None, event: Event | None, raw: str,
                           error: str, attempts: int) -> None:
        while True:
            try:
                await record_dead_letter(await self._db(), source, topic, pid, event, raw, error, attempts)
                break
            except (asyncmy.errors.MySQLError, OSError) as exc:
                log.warning("consume: cannot record dead letter yet (%s)", exc)
                self._drop_db()
                await asyncio.sleep(0.5)
        assert self._producer is not None
        message = dead_letter_message(source, topic, pid, event, raw, error, attempts)
        await (await self._producer.send(self.s.topic(DLQ), key=str(pid).encode() if pid else None, value=message))
        self.stats.dead += 1
        log.error("consume: %s -> %s (payment %s): %s", source, DLQ, pid, error)

    def _count(self, outcome: str, topic: str) -> None:
        if outcome == APPLIED:
            self.stats.applied += 1
            self.stats.by_topic[topic] = self.stats.by_topic.get(topic, 0) + 1
        elif outcome == DUPLICATE:
            self.stats.duplicates += 1
        else:
            self.stats.parked += 1


def stats_text(stats: ConsumerStats) -> str:
    """The consumer's Prometheus exposition (its own port: CONSUMER_METRICS_PORT)."""
    lines = ["# TYPE payapp_consumer_events_total counter"]
    for outcome, n in ((APPLIED, stats.applied), (DUPLICATE, stats.duplicates), (PARKED, stats.parked),
                       ("dead", stats.dead)):  # fmt: skip
        lines.append(f'payapp_consumer_events_total{{outcome="{outcome}"}} {n}')
    lines.append("# TYPE payapp_settlement_events_total counter")
    for topic, n in sorted(stats.by_topic.items()):
        lines.append(f'payapp_settlement_events_total{{topic="{topic}"}} {n}')
    return "\n".join(lines) + "\n"


async def serve_consumer(db_url: str, settings: EventSettings, stop: asyncio.Event, host: str = "") -> ConsumerStats:
    """Run the consumer (and its metrics endpoint when CONSUMER_METRICS_PORT is set) until ``stop``."""
    from payapp.metrics import metrics_site

    worker = Worker(db_url, settings)
    async with metrics_site(host, settings.consumer_metrics_port, lambda: stats_text(worker.stats)):
        await worker.run(stop)
    return worker.stats
