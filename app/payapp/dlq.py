"""``payapp dlq list|replay|requeue``: dead letters and the events parked behind them.

Dead letters come from two places. The consumer's (source ``topic:partition:offset``) are messages it could not
apply: replaying one re-parses its stored payload and applies it; when that works the dead letter becomes RESOLVED
and, once the payment has no OPEN dead letter left, its parked events are applied in sequence order. A replay that
fails again leaves the dead letter OPEN with the new error and one more attempt.

The relay's (source ``outbox-relay:<eventId>``) are outbox rows whose topic the relay's release did not know: they
were never published, so there is nothing to apply yet. Requeueing one puts its outbox row back into the outbox
(unpublished; re-inserted from the stored payload if it was purged meanwhile) and marks the dead letter RESOLVED, in
one transaction, so the relay of a release that knows the topic publishes it like any other row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncmy
import orjson

from payapp import db
from payapp.consumer import APPLIED, PARKED, apply_event
from payapp.errors import PayappError
from payapp.events import RELAY_SOURCE, TOPICS, parse_event


def from_relay(source: str) -> bool:
    """True for a dead letter the outbox relay wrote (an unroutable outbox row), False for the consumer's.

    The relay writes ``outbox-relay:<eventId>``; earlier releases wrote the bare prefix, so it is matched too."""
    return source == RELAY_SOURCE or source.startswith(RELAY_SOURCE + ":")


@dataclass(frozen=True)
class DeadLetter:
    dlq_id: int
    source: str
    event_id: str | None
    payment_id: int | None
    topic: str
    sequence: int | None
    error: str
    attempts: int
    status: str
    created_at: datetime
    parked: int


_COLUMNS = ("d.dlq_id, d.source, d.event_id, d.payment_id, d.topic, d.`sequence`, d.error, d.attempts, d.status,"
            " d.created_at, (SELECT COUNT(*) FROM parked_event p WHERE p.payment_id = d.payment_id)")


async def list_dead(conn: asyncmy.Connection, include_resolved: bool = False) -> list[DeadLetter]:
    where = "" if include_resolved else "WHERE d.status = 'OPEN'"
    res = await db.execute(conn, f"SELECT {_COLUMNS} FROM dlq_event d {where} ORDER BY d.dlq_id")
    return [DeadLetter(int(r[0]), r[1], r[2], None if r[3] is None else int(r[3]), r[4],
                       None if r[5] is None else int(r[5]), r[6], int(r[7]), r[8], r[9], int(r[10]))
            for r in res.rows]


@dataclass(frozen=True)
class ReplayResult:
    dlq_id: int
    ok: bool
    detail: str
    parked_applied: int = 0


async def replay(conn: asyncmy.Connection, event_id: str | None = None) -> list[ReplayResult]:
    """Replay the OPEN dead letter with ``event_id`` (an eventId or a dlq id), or all of them in order."""
    out: list[ReplayResult] = []
    for dead in await list_dead(conn):
        if event_id is not None and event_id not in (dead.event_id, str(dead.dlq_id)):
            continue
        if from_relay(dead.source):
            # Never published, so there is nothing to apply: applying it here would settle an event no consumer
            # of its topic ever sees.
            out.append(ReplayResult(dead.dlq_id, False, "an outbox row the relay could not route: requeue it with"
                                    f" payapp dlq requeue --event-id {dead.event_id or dead.dlq_id}"))
            continue
        out.append(await _replay_one(conn, dead))
    return out


async def _replay_one(conn: asyncmy.Connection, dead: DeadLetter) -> ReplayResult:
    payload = (await db.execute(conn, "SELECT payload FROM dlq_event WHERE dlq_id = %s", dead.dlq_id)).rows[0][0]
    try:
        event = parse_event(dead.topic, payload)
        outcome = await apply_event(conn, event, resolve=dead.dlq_id)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        await db.execute(conn, "UPDATE dlq_event SET attempts = attempts + 1, error = %s WHERE dlq_id = %s",
                         error[:4000], dead.dlq_id)
        return ReplayResult(dead.dlq_id, False, error)
    if outcome == PARKED:  # another dead letter of this payment is still open
        return ReplayResult(dead.dlq_id, False, "parked behind another open dead letter of the payment")
    applied = await drain_parked(conn, event.payment_id)
    return ReplayResult(dead.dlq_id, True, outcome, applied)


async def drain_parked(conn: asyncmy.Connection, payment_id: int) -> int:
    """Apply the payment's parked events in sequence order, if it has no OPEN dead letter left."""
    open_left = await db.execute(
        conn, "SELECT COUNT(*) FROM dlq_event WHERE payment_id = %s AND status = 'OPEN'", payment_id)
    if int(open_left.rows[0][0]):
        return 0
    rows = (await db.execute(
        conn, "SELECT event_id, topic, payload FROM parked_event WHERE payment_id = %s ORDER BY `sequence`",
        payment_id)).rows
    applied = 0
    for event_id, topic, payload in rows:
        outcome = await apply_event(conn, parse_event(topic, payload))
        if outcome == APPLIED:
            applied += 1
        await db.execute(conn, "DELETE FROM parked_event WHERE event_id = %s", event_id)
    return applied


@dataclass(frozen=True)
class RequeueResult:
    dlq_id: int
    event_id: str | None
    topic: str
    ok: bool
    detail: str


async def requeue(conn: asyncmy.Connection, event_id: str | None = None,
                  known_topics: tuple[str, ...] = TOPICS) -> list[RequeueResult]:
    """Put the relay's OPEN dead letter ``event_id`` (an eventId or a dlq id), or all of them (None), back into the
    outbox. ``known_topics``: the topics this release publishes; a dead letter of another topic is refused (its row
    would only be dead-lettered again).

    Raises PayappError when ``event_id`` matches no OPEN dead letter, or one the consumer wrote (replay those)."""
    if event_id is None:
        dead = [d for d in await list_dead(conn) if from_relay(d.source)]
    else:
        dead = [d for d in await list_dead(conn) if event_id in (d.event_id, str(d.dlq_id))]
    if event_id is not None:
        if not dead:
            raise PayappError(f"no open dead letter has eventId or dlq id {event_id}",
                              "payapp dlq list shows the open ones")
        consumer_side = [d for d in dead if not from_relay(d.source)]
        if consumer_side:
            d = consumer_side[0]
            raise PayappError(
                f"dead letter {d.dlq_id} came from the consumer ({d.source}), not the outbox relay: its event was "
                "published and failed to apply, so there is nothing to put back into the outbox",
                f"replay it after the fix: payapp dlq replay --event-id {d.event_id or d.dlq_id}")
    out: list[RequeueResult] = []
    for d in dead:
        if d.topic not in known_topics:
            out.append(RequeueResult(d.dlq_id, d.event_id, d.topic, False,
                                     f"this release does not publish topic {d.topic} either: requeue it from a "
                                     "release that does"))
            continue
        out.append(await _requeue_one(conn, d.dlq_id))
    return out


async def _requeue_one(conn: asyncmy.Connection, dlq_id: int) -> RequeueResult:
    await db.execute(conn, "BEGIN")
    try:
        # Locked and re-checked: two operators (or a retry) requeue it once.
        rows = (await db.execute(
            conn, "SELECT event_id, topic, `sequence`, payload, status FROM dlq_event WHERE dlq_id = %s FOR UPDATE",
            dlq_id)).rows
        event_id, topic, sequence, payload, status = rows[0]
        if status != "OPEN":
            await db.execute(conn, "ROLLBACK")
            return RequeueResult(dlq_id, event_id, topic, False, f"already {status}")
        # The relay marked the row published when it dead-lettered it; unmarking keeps its id, so it goes out in
        # the next round (before newer rows).
        res = await db.execute(
            conn, "UPDATE outbox_event SET published_at = NULL WHERE event_id = %s AND published_at IS NOT NULL",
            event_id)
        if res.rowcount == 1:
            detail = "outbox row unpublished"
        elif (await db.execute(conn, "SELECT 1 FROM outbox_event WHERE event_id = %s", event_id)).rows:
            detail = "outbox row already unpublished"
        else:
            detail = await _reinsert(conn, event_id, topic, sequence, payload)
        await db.execute(
            conn, "UPDATE dlq_event SET status = 'RESOLVED', resolved_at = UTC_TIMESTAMP(6) WHERE dlq_id = %s; COMMIT",
            dlq_id)
        return RequeueResult(dlq_id, event_id, topic, True, detail)
    except BaseException:
        await db.rollback_quietly(conn)
        raise


async def _reinsert(conn: asyncmy.Connection, event_id: str, topic: str, sequence: int | None, payload: str) -> str:
    """The outbox row was purged (retention) since: write it again from the stored payload, same eventId."""
    try:
        data = orjson.loads(payload)
        payment_id, merchant_id, event_type = int(data["paymentId"]), str(data["merchantId"]), str(data["type"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise PayappError(f"the outbox row of event {event_id} was purged and its stored payload does not name its "
                          "payment, merchant and type", "re-send it as a corrected event") from None
    await db.execute(
        conn,
        "INSERT INTO outbox_event (event_id, topic, event_type, payment_id, merchant_id, `sequence`, payload,"
        " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
        event_id, topic, event_type, payment_id, merchant_id, sequence if sequence is not None else 0, payload)
    return "outbox row re-inserted (it had been purged)"
