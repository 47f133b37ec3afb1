"""Shared pieces of the event pipeline: topics, event parsing, Kafka settings and clients, leases, consumer lag.

docs/events.md describes the pipeline. The Kafka settings are read from the same PAYAPP_* environment (and
``--env-file``) as ``payapp.settings``, into a frozen ``EventSettings``; every default is valid on a single broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncmy
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CoordinatorNotAvailableError,
    GroupCoordinatorNotAvailableError,
    KafkaError,
    TopicAlreadyExistsError,
)
from aiokafka.structs import TopicPartition

from payapp import db
from payapp.errors import ConfigError, PayappError
from payapp.settings import PREFIX, Spec, int_range, merged_environ

T = TypeVar("T")

AUTHORIZED = "payment.authorized"
CAPTURED = "payment.captured"
REFUNDED = "payment.refunded"
CANCELLED = "payment.cancelled"
SETTLED = "payment.settled"
RECONCILED = "reconciliation.completed"
DLQ = "payment.dlq"
TOPICS = (AUTHORIZED, CAPTURED, REFUNDED, CANCELLED, SETTLED, RECONCILED, DLQ)
# What the settlement consumer reads: the API's events (payment.settled is its own output).
CONSUMED = (AUTHORIZED, CAPTURED, REFUNDED, CANCELLED)
SCHEMA_VERSIONS = (1,)
#: dlq_event.source prefix of the relay's dead letters (unroutable outbox rows): ``outbox-relay:<eventId>``.
RELAY_SOURCE = "outbox-relay"


def _float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected on/off (or 1/0, true/false)")


def _compression(raw: str) -> str:
    if raw not in ("lz4", "gzip", "snappy", "zstd", "none"):
        raise ValueError("expected lz4, gzip, snappy, zstd or none")
    return raw


def _zone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone such as Asia/Seoul") from None
    return raw


@dataclass(frozen=True)
class EventSettings:
    kafka_bootstrap: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    idempotence: bool
    compression: str
    batch_size: int
    linger_ms: int
    group: str
    relay_batch: int
    relay_poll_s: float
    publish_timeout_s: float
    outbox_retention_s: int
    idempotency_retention_s: int
    lease_ttl_s: float
    consumer_max_attempts: int
    metrics_port: int
    consumer_metrics_port: int
    reconcile_tz: str
    reconcile_settle_lag_s: int
    reconcile_minute: int
    topic_prefix: str

    def topic(self, name: str) -> str:
        """The Kafka topic of logical topic ``name`` (outbox rows and payloads hold logical names)."""
        return self.topic_prefix + name

    def logical(self, kafka_topic: str) -> str:
        return kafka_topic.removeprefix(self.topic_prefix)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EventSettings:
        values: dict[str, Any] = {}
        problems: list[str] = []
        for spec in EVENT_SPECS:
            raw = environ.get(PREFIX + spec.name, "").strip() or (spec.default or "")
            try:
                values[spec.field] = spec.parse(raw)
            except ValueError as exc:
                problems.append(f"{PREFIX}{spec.name}={raw!r}: {exc}")
        if problems:
            raise ConfigError("invalid payapp event settings", "set them in the environment or the --env-file",
                              problems)
        return cls(**values)

    def require_bootstrap(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError("PAYAPP_KAFKA_BOOTSTRAP is not set", "give the brokers as host:port[,host:port]")
        return self.kafka_bootstrap


EVENT_SPECS: tuple[Spec, ...] = (
    Spec("KAFKA_BOOTSTRAP", "kafka_bootstrap", str, "", "Kafka brokers (host:port,...)"),
    Spec("KAFKA_PARTITIONS", "partitions", int_range(1, 1000), "1",
         "partitions per topic, fixed at the first deployment (keys never move); sized for the largest phase"),
    Spec("KAFKA_REPLICATION_FACTOR", "replication_factor", int_range(1, 5), "1", "replication factor of the topics"),
    Spec("KAFKA_MIN_INSYNC_REPLICAS", "min_insync_replicas", int_range(1, 5), "1",
         "min.insync.replicas of the topics (acks=all waits for this many)"),
    Spec("KAFKA_IDEMPOTENCE", "idempotence", _bool, "on", "idempotent producer (Apache Kafka: on; Tansu: off)"),
    Spec("KAFKA_COMPRESSION", "compression", _compression, "lz4", "producer compression"),
    Spec("KAFKA_BATCH_SIZE", "batch_size", int_range(1024, 16 * 1024 * 1024), "16384", "producer batch size in bytes"),
    Spec("KAFKA_LINGER_MS", "linger_ms", int_range(0, 10000), "10", "producer linger"),
    Spec("KAFKA_GROUP", "group", str, "payapp-settlement", "consumer group of `payapp consume`"),
    Spec("RELAY_BATCH", "relay_batch", int_range(1, 100000), "500", "outbox rows the relay publishes per round"),
    Spec("RELAY_POLL_S", "relay_poll_s", _float, "0.02", "relay sleep when the outbox is empty"),
    Spec("RELAY_PUBLISH_TIMEOUT_S", "publish_timeout_s", _float, "30",
         "how long the relay waits for acks before it abandons its producer and retries"),
    Spec("OUTBOX_RETENTION_S", "outbox_retention_s", int_range(0, 10**9), "604800",
         "published outbox rows (and processed-event ids) older than this are purged"),
    Spec("IDEMPOTENCY_RETENTION_S", "idempotency_retention_s", int_range(0, 10**9), "604800",
         "idempotency keys older than this are purged (a retry after that creates a new operation)"),
    Spec("LEASE_TTL_S", "lease_ttl_s", _float, "10", "relay lease; a standby takes over this long after a crash"),
    Spec("CONSUMER_MAX_ATTEMPTS", "consumer_max_attempts", int_range(1, 100), "3",
         "failures of one message before it goes to payment.dlq"),
    Spec("RELAY_METRICS_PORT", "metrics_port", int_range(0, 65535), "0",
         "relay's Prometheus port (outbox backlog and age, consumer lag, DLQ, latest reconciliation); 0 = off"),
    Spec("CONSUMER_METRICS_PORT", "consumer_metrics_port", int_range(0, 65535), "0",
         "consumer's Prometheus port (events applied, duplicate, parked, dead-lettered); 0 = off"),
    Spec("RECONCILE_TZ", "reconcile_tz", _zone, "Asia/Seoul", "time zone of the business day"),
    Spec("RECONCILE_SETTLE_LAG_S", "reconcile_settle_lag_s", int_range(0, 86400), "60",
         "money movements younger than this are not judged (still in flight)"),
    Spec("RECONCILE_MINUTE", "reconcile_minute", int_range(0, 59), "5", "minute of each hour the scheduled run starts"),
    Spec("KAFKA_TOPIC_PREFIX", "topic_prefix", str, "",
         "prefix of every Kafka topic name (several environments or test runs on one cluster)"),
)

assert {s.field for s in EVENT_SPECS} == {f.name for f in fields(EventSettings)}


def load_event_settings(env_file: str | Path | None = None,
                        environ: Mapping[str, str] | None = None) -> EventSettings:
    return EventSettings.from_env(merged_environ(env_file, environ))


def node_name() -> str:
    """Who holds a lease: host, pid and a random part (a restarted process is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# --- events ----------------------------------------------------------------------------------------------------------


class PoisonError(Exception):
    """A message that can never be applied as it is (unparseable, wrong schema)."""


@dataclass(frozen=True)
class Event:
    event_id: str
    type: str
    topic: str
    payment_id: int
    merchant_id: str
    operation_id: int
    amount: int
    currency: str
    sequence: int
    occurred_at: str
    raw: str


def parse_event(topic: str, value: bytes | str | None) -> Event:
    """Validate an event's JSON; raises PoisonError naming what is wrong."""
    if value is None:
        raise PoisonError("empty message")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise PoisonError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PoisonError("not a JSON object")
    if data.get("schemaVersion") not in SCHEMA_VERSIONS:
        raise PoisonError(f"unsupported schemaVersion {data.get('schemaVersion')!r}")
    try:
        event = Event(
            event_id=_typed(data, "eventId", str), type=_typed(data, "type", str), topic=topic,
            payment_id=_typed(data, "paymentId", int), merchant_id=_typed(data, "merchantId", str),
            operation_id=_typed(data, "operationId", int), amount=_typed(data, "amount", int),
            currency=_typed(data, "currency", str), sequence=_typed(data, "sequence", int),
            occurred_at=_typed(data, "occurredAt", str),
            raw=value.decode() if isinstance(value, bytes) else value,
        )
    except (KeyError, TypeError) as exc:
        raise PoisonError(str(exc.args[0])) from None
    if len(event.event_id) != 36:
        raise PoisonError("eventId is not a UUID")
    return event


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise KeyError(f"missing {key}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key} is not a {kind.__name__}")
    return value


def key_payment_id(key: bytes | None) -> int | None:
    """The paymentId a message is keyed by (so even an unparseable message names its payment)."""
    try:
        return int(key) if key else None
    except ValueError:
        return None


# --- Kafka clients ---------------------------------------------------------------------------------------------------


def producer(s: EventSettings) -> AIOKafkaProducer:
    """The one producer configuration: acks=all, key = paymentId, batching and idempotence from settings."""
    return AIOKafkaProducer(
        bootstrap_servers=s.require_bootstrap(), acks="all", enable_idempotence=s.idempotence,
        compression_type=None if s.compression == "none" else s.compression, max_batch_size=s.batch_size,
        linger_ms=s.linger_ms, request_timeout_ms=int(max(s.publish_timeout_s, 1) * 1000),
    )


def consumer(s: EventSettings, *topics: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *(s.topic(t) for t in topics), bootstrap_servers=s.require_bootstrap(), group_id=s.group,
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500,
    )


async def ensure_topics(s: EventSettings) -> list[str]:
    """Create the topics that do not exist yet (partitions, RF and min ISR from settings); returns the new ones."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.require_bootstrap())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s.topic(t) for t in TOPICS if s.topic(t) not in existing]
        created: list[str] = []
        for topic in missing:
            try:
                await admin.create_topics([NewTopic(
                    topic, num_partitions=s.partitions, replication_factor=s.replication_factor,
                    topic_configs={"min.insync.replicas": str(s.min_insync_replicas)})])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another node created it first
        return created
    finally:
        await admin.close()


@dataclass(frozen=True)
class Lag:
    group: str
    per_partition: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_partition.values())


async def consumer_lag(s: EventSettings, topics: tuple[str, ...] = CONSUMED) -> Lag:
    """End offsets minus the group's committed offsets, from the admin side: it rises even with every consumer dead.

    A partition the group never committed counts from its start. Brokers whose admin API aiokafka cannot speak
    (Tansu 0.6) are asked as a non-member of the group instead, over PAYAPP_KAFKA_PARTITIONS partitions."""
    bootstrap = s.require_bootstrap()
    try:
        partitions, committed = await _admin_view(s, topics)
    except (KafkaError, ValueError):
        partitions = [TopicPartition(s.topic(t), p) for t in topics for p in range(s.partitions)]
        committed = None
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=s.group if committed is None else None)
    await probe.start()
    try:
        ends = await probe.end_offsets(partitions) if partitions else {}
        begins = await probe.beginning_offsets(partitions) if partitions else {}
        out: dict[str, int] = {}
        for tp in partitions:
            if committed is None:
                offset = await probe.committed(tp)  # reads the group's offsets without joining it
            else:
                meta = committed.get(tp)
                offset = meta.offset if meta is not None else None
            done = offset if offset is not None and offset >= 0 else begins[tp]
            out[f"{s.logical(tp.topic)}[{tp.partition}]"] = max(ends[tp] - done, 0)
        return Lag(s.group, out)
    finally:
        await probe.stop()


async def _admin_view(s: EventSettings, topics: tuple[str, ...]) -> tuple[list[TopicPartition], dict[Any, Any]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.require_bootstrap())
    await admin.start()
    try:
        committed = await _group_offsets(admin, s.group)
        described = await admin.describe_topics([s.topic(t) for t in topics])
        partitions = sorted(
            (TopicPartition(d["topic"], int(p["partition"])) for d in described if d.get("error_code", 0) == 0
             for p in d.get("partitions", ())),
            key=lambda tp: (tp.topic, tp.partition),
        )
        return partitions, committed
    finally:
        await admin.close()


async def _group_offsets(admin: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, Any]:
    # The first lookup on a fresh cluster creates __consumer_offsets; the coordinator appears a moment later.
    for attempt in range(20):
        try:
            offsets: dict[TopicPartition, Any] = await admin.list_consumer_group_offsets(group)
            return offsets
        except (GroupCoordinatorNotAvailableError, CoordinatorNotAvailableError):
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


# --- leases ----------------------------------------------------------------------------------------------------------


async def acquire_lease(conn: asyncmy.Connection, name: str, owner: str, ttl_s: float) -> bool:
    """Take or renew lease ``name`` for ``owner``; True when ``owner`` holds it now (database clock)."""
    take = ("UPDATE lease SET owner = %s, expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
            " WHERE name = %s AND (owner = %s OR expires_at < UTC_TIMESTAMP(6))")
    args = (owner, int(ttl_s * 1_000_000), name, owner)
    if (await db.execute(conn, take, *args)).rowcount == 1:
        return True
    # Held by someone else, or the row does not exist yet (asyncmy logs a warning for every ignored duplicate,
    # so the insert is only tried when the update found nothing to take).
    if (await db.execute(conn, "SELECT 1 FROM lease WHERE name = %s", name)).rows:
        return False
    await db.execute(conn, "INSERT IGNORE INTO lease (name, owner, expires_at) VALUES (%s, '', '1970-01-01')", name)
    return (await db.execute(conn, take, *args)).rowcount == 1


async def release_lease(conn: asyncmy.Connection, name: str, owner: str) -> None:
    await db.execute(conn, "UPDATE lease SET expires_at = '1970-01-01' WHERE name = %s AND owner = %s", name, owner)


async def lease_holder(conn: asyncmy.Connection, name: str) -> str | None:
    res = await db.execute(conn, "SELECT owner FROM lease WHERE name = %s AND expires_at >= UTC_TIMESTAMP(6)", name)
    return str(res.rows[0][0]) if res.rows else None


async def connect(db_url: str) -> asyncmy.Connection:
    """A dedicated connection for a worker loop, in UTC and READ COMMITTED."""
    from payapp.settings import DbTarget

    try:
        conn = await db.connect(DbTarget.parse(db_url))
    except asyncmy.errors.MySQLError as exc:
        raise PayappError(f"cannot connect to MariaDB: {exc}", "check PAYAPP_DB_URL and that MariaDB runs") from exc
    await db.execute(conn, "SET SESSION tx_isolation = 'READ-COMMITTED', innodb_lock_wait_timeout = 10")
    return conn


class Stopped(Exception):
    """``stop`` was set while waiting (``wait_or_stop``)."""


async def wait_or_stop(aw: Awaitable[T], stop: asyncio.Event, timeout: float) -> T:
    """``aw``'s result within ``timeout`` s (TimeoutError otherwise, as asyncio.wait_for), or ``Stopped`` as soon as
    ``stop`` is set: SIGTERM must not wait for a broker that does not answer (supervisord kills after 30 s)."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    # Cancelled, not awaited: a client that swallows the cancellation (aiokafka retrying a commit) must not hold
    # us here; its outcome is read and dropped when it ends.
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if stopper in done:
        raise Stopped()
    raise TimeoutError()


async def bounded(what: str, aw: Awaitable[object], timeout: float, logger: logging.Logger) -> None:
    """Await a client's stop()/commit() at shutdown for at most ``timeout`` s; what goes wrong is logged, not
    raised. aiokafka's consumer stop() raises CancelledError when a fetch was in its retry backoff (the broker down):
    that is not this task being cancelled, so it is swallowed unless this task really is."""
    try:
        await asyncio.wait_for(aw, timeout)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        logger.warning("%s: interrupted by the Kafka client's own cancellation (broker unreachable?)", what)
    except (TimeoutError, KafkaError, OSError) as exc:
        logger.warning("%s: did not finish within %.0fs (%s)", what, timeout, exc or type(exc).__name__)


async def sleep_until(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return stop.is_set()
