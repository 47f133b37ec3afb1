"""``payapp reconcile``: checks the ledger and the settlements of a business day and writes a report.

Scope: the business day in ``RECONCILE_TZ`` (default Asia/Seoul), from its midnight to the end of the day or to
now - ``RECONCILE_SETTLE_LAG_S``, whichever is earlier, so work still in flight is not judged. Checks:

1. Σ debit = Σ credit over the window's ``ledger_entry`` rows (and per payment, to name the culprit);
2. for every payment with an operation in the window: Σ settled_amount = captured - refunded, over its operations
   up to the cutoff;
3. every capture up to the cutoff has its settlement.

The result is a ``reconciliation_report`` row and a ``reconciliation.completed`` event (outbox, same
transaction). Runs are serialised by a MariaDB named lock: a manual run waits for a running one. The hourly
schedule claims each hour in the ``lease`` row ``reconcile-schedule`` (``slot``), so exactly one node runs it; the
first run after midnight also closes the previous day.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncmy
import orjson

from payapp import db
from payapp.db import iso, utcnow
from payapp.errors import PayappError
from payapp.events import RECONCILED, EventSettings, sleep_until

log = logging.getLogger("payapp.reconcile")
LOCK = "payapp.reconcile"
SCHEDULE = "reconcile-schedule"
MAX_IDS = 1000


@dataclass(frozen=True)
class Window:
    report_date: date
    time_zone: str
    start: datetime  # naive UTC
    end: datetime  # naive UTC, exclusive


def business_window(now: datetime, tz: str, settle_lag_s: int, day: date | None = None) -> Window:
    """The window of ``day`` (default: today in ``tz``), cut at now - settle lag. ``now`` is naive UTC."""
    zone = ZoneInfo(tz)
    aware_now = now.replace(tzinfo=UTC)
    day = day or aware_now.astimezone(zone).date()
    start = datetime.combine(day, time(0), zone).astimezone(UTC).replace(tzinfo=None)
    day_end = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC).replace(tzinfo=None)
    return Window(day, tz, start, max(start, min(day_end, now - timedelta(seconds=settle_lag_s))))


@dataclass(frozen=True)
class Report:
    report_id: int
    window: Window
    total_debit: int
    total_credit: int
    is_balanced: bool
    payments_checked: int
    captures_checked: int
    settlements_checked: int
    unbalanced_payments: tuple[int, ...]
    missing_settlements: tuple[int, ...]
    settlement_mismatches: tuple[int, ...]

    @property
    def mismatched_payment_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.unbalanced_payments) | set(self.missing_settlements)
                            | set(self.settlement_mismatches)))


_IN_SCOPE = "SELECT DISTINCT payment_id FROM payment_operation WHERE created_at >= %s AND created_at < %s"


@dataclass(frozen=True)
class Checks:
    total_debit: int
    total_credit: int
    unbalanced: tuple[int, ...]
    mismatch: tuple[int, ...]
    missing: tuple[int, ...]
    payments: int
    captures: int
    settlements: int


async def check(conn: asyncmy.Connection, w: Window) -> Checks:
    """Run the three checks over window ``w`` (read-only)."""
    b = db.Batch()
    i_tot = b.add(
        "SELECT COALESCE(SUM(IF(direction = 'DEBIT', amount, 0)), 0), COALESCE(SUM(IF(direction = 'CREDIT', amount,"
        " 0)), 0) FROM ledger_entry WHERE created_at >= %s AND created_at < %s", w.start, w.end)
    i_unbal = b.add(
        "SELECT payment_id FROM ledger_entry WHERE created_at >= %s AND created_at < %s GROUP BY payment_id"
        " HAVING SUM(IF(direction = 'DEBIT', amount, -amount)) <> 0 ORDER BY payment_id", w.start, w.end)
    i_pay = b.add(
        "SELECT s.payment_id,"
        " (SELECT COALESCE(SUM(IF(o.kind = 'CAPTURE', o.amount, -o.amount)), 0) FROM payment_operation o"
        "   WHERE o.payment_id = s.payment_id AND o.kind IN ('CAPTURE', 'REFUND') AND o.created_at < %s),"
        " (SELECT COALESCE(SUM(t.settled_amount), 0) FROM settlement t JOIN payment_operation o"
        "   ON o.operation_id = t.operation_id WHERE t.payment_id = s.payment_id AND o.created_at < %s),"
        " (SELECT COUNT(*) FROM settlement t WHERE t.payment_id = s.payment_id)"
        f" FROM ({_IN_SCOPE}) s ORDER BY s.payment_id", w.end, w.end, w.start, w.end)
    i_miss = b.add(
        "SELECT o.payment_id, COUNT(*) FROM payment_operation o LEFT JOIN settlement t"
        " ON t.operation_id = o.operation_id AND t.kind = 'CAPTURE'"
        " WHERE o.kind = 'CAPTURE' AND o.created_at >= %s AND o.created_at < %s"
        " GROUP BY o.payment_id HAVING SUM(t.settlement_id IS NULL) > 0 ORDER BY o.payment_id", w.start, w.end)
    i_caps = b.add("SELECT COUNT(*) FROM payment_operation WHERE kind = 'CAPTURE' AND created_at >= %s"
                   " AND created_at < %s", w.start, w.end)
    r = await b.run(conn)
    debit, credit = (int(v) for v in r[i_tot].rows[0])
    payments = r[i_pay].rows
    return Checks(
        total_debit=debit, total_credit=credit,
        unbalanced=tuple(int(x[0]) for x in r[i_unbal].rows),
        mismatch=tuple(int(p[0]) for p in payments if int(p[1]) != int(p[2])),
        missing=tuple(int(x[0]) for x in r[i_miss].rows),
        payments=len(payments), captures=int(r[i_caps].rows[0][0]),
        settlements=sum(int(p[3]) for p in payments),
    )


async def run_once(conn: asyncmy.Connection, s: EventSettings, *, day: date | None = None, now: datetime | None = None,
                   trigger: str = "manual", wait_s: float = 600) -> Report:
    """Reconcile one business day and write its report (waits for a running reconciliation first)."""
    got = await db.execute(conn, "SELECT GET_LOCK(%s, %s)", LOCK, int(wait_s))
    if got.rows[0][0] != 1:
        raise PayappError("another reconciliation is still running", "wait for it, or run again later")
    try:
        w = business_window(now or utcnow(), s.reconcile_tz, s.reconcile_settle_lag_s, day)
        c = await check(conn, w)
        unbal, missing, mismatch = c.unbalanced, c.missing, c.mismatch
        balanced = c.total_debit == c.total_credit and not unbal and not missing and not mismatch
        ids = sorted(set(unbal) | set(missing) | set(mismatch))
        created = utcnow()
        b = db.Batch()
        b.add("BEGIN")
        i_ins = b.add(
            "INSERT INTO reconciliation_report (report_date, time_zone, window_start, window_end, total_debit,"
            " total_credit, is_balanced, payments_checked, captures_checked, settlements_checked,"
            " unbalanced_payments, missing_settlements, settlement_mismatches, mismatched_payment_ids,"
            " trigger_kind, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            w.report_date, w.time_zone, w.start, w.end, c.total_debit, c.total_credit, balanced,
            c.payments, c.captures, c.settlements, len(unbal), len(missing), len(mismatch),
            ",".join(str(i) for i in ids[:MAX_IDS]), trigger, created)
        report_id = (await b.run(conn))[i_ins].lastrowid
        event_id = str(uuid.uuid4())
        payload = orjson.dumps({
            "eventId": event_id, "type": "ReconciliationCompleted", "schemaVersion": 1, "reportId": report_id,
            "reportDate": w.report_date.isoformat(), "timeZone": w.time_zone, "windowStart": iso(w.start),
            "windowEnd": iso(w.end), "totalDebit": c.total_debit, "totalCredit": c.total_credit,
            "isBalanced": balanced, "mismatchedPaymentIds": ids[:MAX_IDS], "occurredAt": iso(created),
        }).decode()
        # Not a payment event: payment_id 0 and the report id as its sequence keep outbox's unique key.
        await db.execute(
            conn,
            "INSERT INTO outbox_event (event_id, topic, event_type, payment_id, merchant_id, `sequence`, payload,"
            " created_at) VALUES (%s, %s, 'ReconciliationCompleted', 0, '', %s, %s, %s); COMMIT",
            event_id, RECONCILED, report_id, payload, created)
        return Report(report_id, w, c.total_debit, c.total_credit, balanced, c.payments, c.captures,
                      c.settlements, unbal, missing, mismatch)
    finally:
        await db.execute(conn, "SELECT RELEASE_LOCK(%s)", LOCK)


async def claim_hour(conn: asyncmy.Connection, slot: str) -> bool:
    """Claim hourly slot ``slot`` (e.g. 2026-11-25T14); exactly one caller gets True per slot."""
    claim = "UPDATE lease SET slot = %s, owner = %s WHERE name = %s AND (slot IS NULL OR slot < %s)"
    if (await db.execute(conn, claim, slot, slot, SCHEDULE, slot)).rowcount == 1:
        return True
    if (await db.execute(conn, "SELECT 1 FROM lease WHERE name = %s", SCHEDULE)).rows:
        return False
    await db.execute(conn, "INSERT IGNORE INTO lease (name, owner, expires_at) VALUES (%s, '', '1970-01-01')",
                     SCHEDULE)
    return (await db.execute(conn, claim, slot, slot, SCHEDULE, slot)).rowcount == 1


async def schedule(connect: Callable[[], Awaitable[asyncmy.Connection]], s: EventSettings, stop: asyncio.Event,
                   every_s: float = 30.0) -> list[Report]:  # fmt: skip
    """The hourly loop: at minute RECONCILE_MINUTE of each hour, the node that claims the hour reconciles.

    A long-running program (``payctl-reconcile``): a database error (the primary restarting, a failover) closes the
    connection and the next round opens a new one; it never exits for it (its supervisor would give up after a few
    quick exits). A run that failed after its claim is not repeated that hour: the next hour's run reconciles the
    whole business day again."""
    done: list[Report] = []
    zone = ZoneInfo(s.reconcile_tz)
    conn: asyncmy.Connection | None = None
    try:
        while not stop.is_set():
            try:
                if conn is None:
                    conn = await connect()
                local = utcnow().replace(tzinfo=UTC).astimezone(zone)
                if local.minute >= s.reconcile_minute and await claim_hour(conn, local.strftime("%Y-%m-%dT%H")):
                    if local.hour == 0:  # the first run of a day closes the previous one
                        done.append(await run_once(conn, s, day=local.date() - timedelta(days=1), trigger="schedule"))
                    done.append(await run_once(conn, s, day=local.date(), trigger="schedule"))
                    log.info("reconcile: report %d balanced=%s", done[-1].report_id, done[-1].is_balanced)
            except (asyncmy.errors.MySQLError, db.BatchError, OSError, EOFError, RuntimeError) as exc:
                log.warning("reconcile: database error, reconnecting next round: %s", exc)
                if conn is not None:
                    conn.close()
                conn = None
            await sleep_until(stop, every_s)
    finally:
        if conn is not None:
            conn.close()
    return done
