"""``payapp relay``: publishes the transactional outbox to Kafka, one active relay at a time.

Each round the lease holder scans ``outbox_event`` for unpublished rows in ``id`` order (a scan, never a
high-water mark: an id allocated earlier may commit later and must not be skipped), sends them with acks=all keyed
by paymentId, waits for every ack, then marks them published. A crash between the ack and the mark republishes
those rows: delivery is at least once and consumers dedupe by eventId. A payment's events are written under its
row lock, so their ids are in sequence order and the single relay keeps that order per payment (= per partition).

When acks do not come within ``RELAY_PUBLISH_TIMEOUT_S`` (broker down, not enough in-sync replicas) the producer
is abandoned (aiokafka retries such sends forever and ``stop()`` would wait for them) and the round is retried
with a fresh one, until the broker is back; the API is never affected, the outbox simply grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncmy
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from payapp import db
from payapp.events import (
    RELAY_SOURCE,
    TOPICS,
    EventSettings,
    Lag,
    Stopped,
    acquire_lease,
    bounded,
    connect,
    consumer_lag,
    ensure_topics,
    node_name,
    producer,
    release_lease,
    sleep_until,
    wait_or_stop,
)

log = logging.getLogger("payapp.relay")
LEASE = "outbox-relay"
STOP_POLL_S = 0.5  # how soon a relay waiting for acks notices SIGTERM

#: The latest reconciliation report, exported as payapp_reconcile_<name> (the relay runs on every app node).
_RECONCILE_FIGURES = ("last_balanced", "last_run_timestamp_seconds", "last_unbalanced_payments",
                      "last_missing_settlements", "last_settlement_mismatches")
_LATEST_RECONCILE = (
    "SELECT is_balanced, UNIX_TIMESTAMP(created_at), unbalanced_payments,"
    " missing_settlements, settlement_mismatches FROM reconciliation_report ORDER BY report_id DESC LIMIT 1"
)


@dataclass
class RelayState:
    """What the relay exports (and tests read)."""

    owner: str
    leader: bool = False
    published: int = 0
    rounds: int = 0
    backlog: int = 0
    purged: int = 0
    producer_resets: int = 0
    publish_errors: int = 0
    dead_lettered: int = 0  # outbox rows the relay could not route (unknown topic), moved to dlq_event
    oldest_unpublished_s: float = 0.0
    dlq_open: int = 0
    lag: dict[str, int] = field(default_factory=dict)
    reconcile: dict[str, float] = field(default_factory=dict)  # the latest reconciliation report's figures


class Relay:
    def __init__(self, db_url: str, settings: EventSettings, owner: str | None = None) -> None:
        self.db_url = db_url
        self.s = settings
        self.state = RelayState(owner or node_name())
        self._producer: AIOKafkaProducer | None = None
        self._abandoned: set[asyncio.Task[None]] = set()
        self._lease_renewed = 0.0
        self._purged_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; survives broker and database outages by retrying."""
        await self._until_topics(stop)
        conn: asyncmy.Connection | None = None
        try:
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = await connect(self.db_url)
                    await self._round(conn, stop)
                except (asyncmy.errors.MySQLError, OSError) as exc:
                    log.warning("relay: database error, reconnecting: %s", exc)
                    if conn is not None:
                        conn.close()
                    conn, self.state.leader = None, False
                    await sleep_until(stop, 1.0)
        finally:
            if conn is not None:
                if self.state.leader:
                    with contextlib.suppress(asyncmy.errors.MySQLError):
                        await release_lease(conn, LEASE, self.state.owner)  # a standby takes over at once
                conn.close()
            await self._close_producer(graceful=True)

    async def _until_topics(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                created = await ensure_topics(self.s)
                if created:
                    log.info("relay: created topics %s", ", ".join(created))
                return
            except (KafkaError, OSError) as exc:
                log.warning("relay: cannot create topics yet (%s); retrying", exc)
                await sleep_until(stop, 2.0)

    async def _renew(self, conn: asyncmy.Connection) -> bool:
        self.state.leader = await acquire_lease(conn, LEASE, self.state.owner, self.s.lease_ttl_s)
        self._lease_renewed = time.monotonic()
        return self.state.leader

    async def _round(self, conn: asyncmy.Connection, stop: asyncio.Event) -> None:
        due = not self.state.leader or time.monotonic() - self._lease_renewed > self.s.lease_ttl_s / 3
        if due and not await self._renew(conn):
            await self._close_producer(graceful=False)
            await sleep_until(stop, self.s.lease_ttl_s / 3)
            return
        rows = (await db.execute(
            conn,
            "SELECT id, topic, payment_id, payload FROM outbox_event WHERE published_at IS NULL ORDER BY id LIMIT %s",
            self.s.relay_batch,
        )).rows
        await self._purge(conn)  # at most once a minute, also when the outbox never empties
        unroutable = [r for r in rows if str(r[1]) not in TOPICS]
        if unroutable:
            await self._dead_letter(conn, unroutable)
            rows = tuple(r for r in rows if str(r[1]) in TOPICS)
        if not rows:
            await sleep_until(stop, self.s.relay_poll_s)
            return
        if await self._publish(conn, rows, stop):
            ids = [int(r[0]) for r in rows]
            await db.execute(
                conn,
                f"UPDATE outbox_event SET published_at = UTC_TIMESTAMP(6) WHERE id IN ({','.join(['%s'] * len(ids))})",
                *ids,
            )
            self.state.published += len(ids)
            self.state.rounds += 1
            if len(rows) < self.s.relay_batch:
                # A partial round means we are caught up: wait a poll interval so the next round carries a batch
                # instead of one or two rows (fewer queries, fewer produce requests; <= RELAY_POLL_S of latency).
                await sleep_until(stop, self.s.relay_poll_s)

    async def _dead_letter(self, conn: asyncmy.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Rows whose topic this relay does not know (a newer release wrote them during a rolling upgrade, or a bug)
        would fail their send forever and block every row behind them: move them to dlq_event (source
        ``outbox-relay:<eventId>``, visible in ``payapp dlq list`` and the payapp_dlq_open gauge) and mark them
        handled, in one transaction. payment_id stays NULL in the dead letter so the consumer does not park the
        payment's other, routable events behind an event it will never see; the id is in the error text.

        The source is unique per event (``uq_dlq_source``: a bare ``outbox-relay`` made the second unroutable row
        fail its insert and stop the relay). A row requeued (``payapp dlq requeue``) to a release that still does not
        know its topic comes back here: its dead letter is reopened with one more attempt."""
        ids = [int(r[0]) for r in rows]
        marks = ",".join(["%s"] * len(ids))
        await conn.begin()
        try:
            await db.execute(
                conn,
                "INSERT INTO dlq_event (source, event_id, payment_id, topic, `sequence`, payload, error, attempts,"
                f" status, created_at) SELECT CONCAT('{RELAY_SOURCE}:', event_id), event_id, NULL, topic, `sequence`,"
                " payload, CONCAT('unknown topic ', topic, ' (payment ', payment_id, ', outbox id ', id,"
                " '): this relay publishes only known topics'), 1, 'OPEN', UTC_TIMESTAMP(6)"
                f" FROM outbox_event WHERE id IN ({marks})"
                " ON DUPLICATE KEY UPDATE status = 'OPEN', resolved_at = NULL, attempts = dlq_event.attempts + 1,"
                " error = VALUES(error)",
                *ids,
            )
            await db.execute(
                conn, f"UPDATE outbox_event SET published_at = UTC_TIMESTAMP(6) WHERE id IN ({marks})", *ids
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        self.state.dead_lettered += len(ids)
        log.error("relay: %d outbox rows with unknown topics moved to the DLQ (%s)", len(ids),
                  ", ".join(sorted({str(r[1]) for r in rows})))

    async def _publish(self, conn: asyncmy.Connection, rows: tuple[tuple[Any, ...], ...], stop: asyncio.Event) -> bool:
        """Send ``rows`` and wait for every ack (renewing the lease meanwhile); False: retry the round. ``stop``
        (SIGTERM) ends the wait at once: the rows stay unpublished and the next relay sends them (at least once)."""
        try:
            if self._producer is None:
                self._producer = producer(self.s)
                await wait_or_stop(self._producer.start(), stop, self.s.publish_timeout_s)
            futures = [
                await self._producer.send(self.s.topic(str(topic)), key=str(pid).encode(), value=str(payload).encode())
                for _, topic, pid, payload in rows
            ]
        except Stopped:
            await self._close_producer(graceful=False)
            return False
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("relay: send failed (%s); new producer, same rows", exc)
            self.state.publish_errors += 1
            await self._close_producer(graceful=False)
            await asyncio.sleep(0.5)
            return False
        deadline = time.monotonic() + self.s.publish_timeout_s
        pending = set(futures)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("relay: %d of %d acks missing after %.0fs; new producer, same rows",
                            len(pending), len(futures), self.s.publish_timeout_s)
                self.state.publish_errors += 1
                await self._close_producer(graceful=False)
                return False
            _, pending = await asyncio.wait(pending, timeout=min(left, self.s.lease_ttl_s / 3, STOP_POLL_S))
            if pending and stop.is_set():
                log.warning("relay: stopping with %d of %d acks missing; the rows stay unpublished (sent again by "
                            "the next relay)", len(pending), len(futures))
                await self._close_producer(graceful=False)
                return False
            if pending and time.monotonic() - self._lease_renewed > self.s.lease_ttl_s / 3:
                await self._renew(conn)
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            log.warning("relay: %d sends failed (%s); retrying", len(failed), failed[0])
            self.state.publish_errors += 1
            await self._close_producer(graceful=False)
            return False
        return True

    async def _close_producer(self, graceful: bool) -> None:
        prod, self._producer = self._producer, None
        if prod is None:
            return
        self.state.producer_resets += 0 if graceful else 1
        if graceful:
            await bounded("relay: producer stop", prod.stop(), 10, log)
            return
        # Never awaited: with sends stuck in retry, stop() waits for them.
        task = asyncio.get_running_loop().create_task(_stop_quietly(prod))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _purge(self, conn: asyncmy.Connection) -> None:
        shortest = min(self.s.outbox_retention_s, self.s.idempotency_retention_s)
        if time.monotonic() - self._purged_at < min(60.0, max(1.0, shortest / 10)):
            return
        self._purged_at = time.monotonic()
        for table, column, retention in (
            ("outbox_event", "published_at", self.s.outbox_retention_s),
            ("processed_event", "processed_at", self.s.outbox_retention_s),
            # Idempotency keys: a claim still IN_PROGRESS that old is dead (its lease is seconds), so age alone decides.
            ("idempotency_key", "created_at", self.s.idempotency_retention_s),
        ):
            res = await db.execute(
                conn,
                f"DELETE FROM {table} WHERE {column} < UTC_TIMESTAMP(6) - INTERVAL %s SECOND LIMIT 10000",
                retention,
            )
            self.state.purged += max(res.rowcount, 0)

    async def refresh_gauges(self, stop: asyncio.Event, every_s: float = 5.0) -> None:
        """Outbox backlog and consumer lag for /metrics, measured from outside the consumers."""
        conn: asyncmy.Connection | None = None
        lag_task: asyncio.Task[Lag] | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = await connect(self.db_url)
                res = await db.execute(
                    conn,
                    "SELECT COUNT(*), COALESCE(TIMESTAMPDIFF(MICROSECOND, MIN(created_at), UTC_TIMESTAMP(6)), 0)"
                    " FROM outbox_event WHERE published_at IS NULL",
                )
                self.state.backlog = int(res.rows[0][0])
                self.state.oldest_unpublished_s = max(0.0, int(res.rows[0][1]) / 1e6)
                res = await db.execute(conn, "SELECT COUNT(*) FROM dlq_event WHERE status = 'OPEN'")
                self.state.dlq_open = int(res.rows[0][0])
                res = await db.execute(conn, _LATEST_RECONCILE)
                if res.rows:
                    self.state.reconcile = dict(zip(_RECONCILE_FIGURES, (float(v) for v in res.rows[0]), strict=True))
                # The lag read runs as its own task: one that hangs inside aiokafka (seen right after the topics
                # were created) must not freeze the other gauges, and cancelling it could hang as well; a new read
                # starts once the previous one has finished.
                if lag_task is None or lag_task.done():
                    lag_task = asyncio.get_running_loop().create_task(consumer_lag(self.s))
                    await asyncio.wait([lag_task], timeout=every_s)
                    lag = _finished(lag_task)
                    if lag is not None:
                        self.state.lag = lag.per_partition
            except Exception as exc:  # a metrics loop must never die: the next round tries again
                log.warning("relay: gauges not refreshed: %r", exc)
                if conn is not None:
                    conn.close()
                conn = None
            await sleep_until(stop, every_s)
        if conn is not None:
            conn.close()
        if lag_task is not None and not lag_task.done():
            lag_task.cancel()

    def metrics_text(self) -> str:
        st = self.state
        lines = [
            "# TYPE payapp_relay_leader gauge", f"payapp_relay_leader {int(st.leader)}",
            "# TYPE payapp_relay_published_total counter", f"payapp_relay_published_total {st.published}",
            "# TYPE payapp_relay_producer_resets_total counter",
            f"payapp_relay_producer_resets_total {st.producer_resets}",
            "# TYPE payapp_relay_publish_errors_total counter",
            f"payapp_relay_publish_errors_total {st.publish_errors}",
            "# TYPE payapp_relay_dead_lettered_total counter",
            f"payapp_relay_dead_lettered_total {st.dead_lettered}",
            "# TYPE payapp_outbox_backlog gauge", f"payapp_outbox_backlog {st.backlog}",
            "# TYPE payapp_outbox_oldest_unpublished_seconds gauge",
            f"payapp_outbox_oldest_unpublished_seconds {st.oldest_unpublished_s:.3f}",
            "# TYPE payapp_dlq_open gauge", f"payapp_dlq_open {st.dlq_open}",
            "# TYPE payapp_consumer_lag gauge",
        ]
        for tp, lag in sorted(st.lag.items()):
            topic, _, part = tp.partition("[")
            lines.append(f'payapp_consumer_lag{{group="{self.s.group}",topic="{topic}",partition="{part[:-1]}"}} {lag}')
        lines += ["# TYPE payapp_consumer_lag_total gauge", f"payapp_consumer_lag_total {sum(st.lag.values())}"]
        for name, value in st.reconcile.items():
            lines += [f"# TYPE payapp_reconcile_{name} gauge", f"payapp_reconcile_{name} {value:g}"]
        return "\n".join(lines) + "\n"


def _finished(task: asyncio.Task[Lag]) -> Lag | None:
    """The lag a finished read produced; None while it runs, or when it failed or was cancelled (aiokafka can
    cancel its own inner futures: ``exception()`` would then raise CancelledError and end the gauge loop)."""
    if not task.done() or task.cancelled():
        return None
    exc = task.exception()
    if exc is not None:
        log.warning("relay: consumer lag not read: %r", exc)
        return None
    return task.result()


async def _stop_quietly(prod: AIOKafkaProducer) -> None:
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        await asyncio.wait_for(prod.stop(), 60)


async def serve_relay(db_url: str, settings: EventSettings, stop: asyncio.Event) -> RelayState:
    """Run the relay (and its metrics endpoint when RELAY_METRICS_PORT is set) until ``stop``."""
    relay = Relay(db_url, settings)
    runner: web.AppRunner | None = None
    gauges: asyncio.Task[None] | None = None
    if settings.metrics_port:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=relay.metrics_text(), content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", settings.metrics_port).start()
        gauges = asyncio.get_running_loop().create_task(relay.refresh_gauges(stop))
    try:
        await relay.run(stop)
    finally:
        if gauges is not None:
            await gauges
        if runner is not None:
            await runner.cleanup()
    return relay.state
