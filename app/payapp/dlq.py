"""``payapp dlq list|replay``: dead letters and the events parked behind them.

Replaying a dead letter re-parses its stored payload and applies it; when that works the dead letter becomes
RESOLVED and, once the payment has no OPEN dead letter left, its parked events are applied in sequence order.
A replay that fails again leaves the dead letter OPEN with the new error and one more attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncmy

from payapp import db
from payapp.consumer import APPLIED, PARKED, apply_event
from payapp.events import parse_event


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
