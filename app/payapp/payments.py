"""Payment operations: authorize, capture, refund, void, get. The HTTP layer (``payapp.api``) only parses and renders.

Each state change is one MariaDB transaction holding everything it implies: the payment row, a
``payment_operation``, its balanced ledger pairs, an outbox event with the payment's next sequence number and,
when the request carries an idempotency key, the stored response. Ids come from ``payapp.ids``, so authorize
sends its transaction in one round trip, as one compound statement (``db.Batch.compound``: one reply instead of
seven); capture, refund and void need two: they lock the payment row (``SELECT ... FOR UPDATE``) and check their
bounds, then write, so concurrent requests are serialised per payment and ``captured <= authorized`` and
``refunded <= captured`` hold under any concurrency (CHECK constraints back them).

Statuses: REQUESTED (authorized) -> COMPLETED (captured, possibly partially, possibly several times)
-> PARTIALLY_REFUNDED / REFUNDED (refunded in full of what was captured); REQUESTED -> CANCELLED (void).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncmy

from payapp import db, idempotency, ids, ledger, outbox
from payapp.db import Batch, BatchError, iso, rollback_quietly, utcnow
from payapp.errors import ApiError, invalid_state, not_found
from payapp.idempotency import Claim

REQUESTED = "REQUESTED"
COMPLETED = "COMPLETED"
PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
REFUNDED = "REFUNDED"
CANCELLED = "CANCELLED"

_PAYMENT_COLUMNS = (
    "payment_id, merchant_id, amount, currency, status, captured_amount, refunded_amount, event_seq,"
    " created_at, updated_at"
)


@dataclass(frozen=True)
class Payment:
    payment_id: int
    merchant_id: str
    amount: int
    currency: str
    status: str
    captured_amount: int
    refunded_amount: int
    event_seq: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Payment:
        return cls(int(row[0]), row[1], int(row[2]), row[3], row[4], int(row[5]), int(row[6]), int(row[7]),
                   row[8], row[9])


@dataclass(frozen=True)
class AuthorizeRequest:
    merchant_id: str
    amount: int
    currency: str
    idempotency_key: str


@dataclass(frozen=True)
class ChangeRequest:
    """Capture, refund or void of one payment; ``amount`` None means "all that is left"."""

    kind: str  # CAPTURE, REFUND, VOID
    merchant_id: str
    payment_id: int
    amount: int | None = None
    reason: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A response ready to send: status, JSON body bytes, and whether it is a replay of a stored one."""

    status: int
    body: bytes
    replayed: bool = False


@dataclass(frozen=True)
class Change:
    """What a capture/refund/void will do to a locked payment."""

    amount: int
    status: str
    captured_amount: int
    refunded_amount: int


_MESSAGES = {
    "AUTHORIZE": "Payment authorized",
    "CAPTURE": "Payment captured",
    "REFUND": "Payment refunded",
    "VOID": "Payment cancelled",
}
_SCOPES = {"CAPTURE": "capture", "REFUND": "refund", "VOID": "void"}


def view(p: Payment, entries: list[ledger.LedgerEntry], message: str) -> dict[str, Any]:
    """The one response shape of every payment endpoint."""
    return {
        "paymentId": p.payment_id,
        "merchantId": p.merchant_id,
        "status": p.status,
        "amount": p.amount,
        "capturedAmount": p.captured_amount,
        "refundedAmount": p.refunded_amount,
        "currency": p.currency,
        "createdAt": iso(p.created_at),
        "updatedAt": iso(p.updated_at),
        "ledgerEntries": [e.to_json() for e in entries],
        "message": message,
    }


def plan_change(p: Payment, req: ChangeRequest) -> Change:
    """Check a capture/refund/void against the payment's state and bounds; raises INVALID_STATE (409)."""
    pid = p.payment_id
    if req.kind == "CAPTURE":
        if p.status not in (REQUESTED, COMPLETED):
            raise invalid_state(f"cannot capture a payment in status {p.status}", pid)
        left = p.amount - p.captured_amount
        amount = left if req.amount is None else req.amount
        if left == 0:
            raise invalid_state("the payment is already captured in full", pid)
        if amount > left:
            raise invalid_state(f"capture of {amount} exceeds the uncaptured authorized amount {left}", pid)
        return Change(amount, COMPLETED, p.captured_amount + amount, p.refunded_amount)
    if req.kind == "REFUND":
        if p.status not in (COMPLETED, PARTIALLY_REFUNDED):
            raise invalid_state(f"cannot refund a payment in status {p.status}", pid)
        left = p.captured_amount - p.refunded_amount
        amount = left if req.amount is None else req.amount
        if left == 0:
            raise invalid_state("the payment is already refunded in full", pid)
        if amount > left:
            raise invalid_state(f"refund of {amount} exceeds the captured amount not yet refunded {left}", pid)
        refunded = p.refunded_amount + amount
        status = REFUNDED if refunded == p.captured_amount else PARTIALLY_REFUNDED
        return Change(amount, status, p.captured_amount, refunded)
    if req.kind == "VOID":
        if p.status != REQUESTED:
            raise invalid_state(f"cannot void a payment in status {p.status}", pid)
        return Change(p.amount, CANCELLED, 0, 0)
    raise ValueError(req.kind)


class Payments:
    """The payment operations over one connection pool. ``dumps`` renders response bodies (the JSON knob)."""

    def __init__(self, pool: db.Pool, dumps: Callable[[Any], bytes], lease_seconds: int) -> None:
        self._pool = pool
        self._dumps = dumps
        self._lease = lease_seconds
        self._payment_ids = ids.payment_ids(pool)
        self._operation_ids = ids.operation_ids(pool)

    async def authorize(self, req: AuthorizeRequest) -> Outcome:
        """One compound statement: claim (stored complete with its response), payment, operation, pair, event,
        commit."""
        now = utcnow()
        claim = idempotency.claim_for(req.merchant_id, "authorize", req.idempotency_key,
                                      {"amount": req.amount, "currency": req.currency})
        payment = Payment(await self._payment_ids.next(), req.merchant_id, req.amount, req.currency, REQUESTED,
                          0, 0, 1, now, now)
        operation_id = await self._operation_ids.next()
        work = Batch()
        work.add(
            "INSERT INTO payment (payment_id, merchant_id, amount, currency, status, event_seq, created_at,"
            " updated_at) VALUES (%s, %s, %s, %s, 'REQUESTED', 1, %s, %s)",
            payment.payment_id, req.merchant_id, req.amount, req.currency, now, now,
        )
        entries = self._stage_operation(work, payment, "AUTHORIZE", operation_id, req.amount, None, now)
        body = self._dumps(view(payment, entries, _MESSAGES["AUTHORIZE"]))
        batch = Batch()
        batch.add("START TRANSACTION")
        idempotency.stage_claim(batch, claim, self._lease, now, idempotency.Stored(200, body), payment.payment_id)
        batch.extend(work)
        batch.add("COMMIT")
        async with self._pool.acquire() as conn:
            try:
                await batch.compound().run(conn)
            except BatchError as exc:  # the transaction is still open: _claim_failed rolls it back
                return await self._claim_failed(conn, exc, None, claim)
        return Outcome(200, body)

    async def change(self, req: ChangeRequest) -> Outcome:
        """Capture, refund or void under the payment's row lock, in two round trips."""
        now = utcnow()
        claim = None
        if req.idempotency_key is not None:
            claim = idempotency.claim_for(req.merchant_id, _SCOPES[req.kind], req.idempotency_key,
                                          {"paymentId": req.payment_id, "amount": req.amount, "reason": req.reason})
        async with self._pool.acquire() as conn:
            first = Batch()
            first.add("BEGIN")
            i_claim = idempotency.stage_claim(first, claim, self._lease, now) if claim else -1
            i_lock = first.add(
                f"SELECT {_PAYMENT_COLUMNS} FROM payment WHERE payment_id = %s AND merchant_id = %s FOR UPDATE",
                req.payment_id, req.merchant_id,
            )
            try:
                results = await first.run(conn)
            except BatchError as exc:
                if claim is None:
                    await rollback_quietly(conn)
                    raise
                return await self._claim_failed(conn, exc, i_claim, claim)
            claim_id = results[i_claim].lastrowid if claim else None
            rows = results[i_lock].rows
            try:
                if not rows:
                    raise not_found(req.payment_id)
                current = Payment.from_row(rows[0])
                change = plan_change(current, req)
            except ApiError as exc:
                return await self._finish_refused(conn, exc, claim_id, req.payment_id)

            payment = Payment(current.payment_id, current.merchant_id, current.amount, current.currency,
                              change.status, change.captured_amount, change.refunded_amount, current.event_seq + 1,
                              current.created_at, now)
            second = Batch()
            second.add(
                "UPDATE payment SET status = %s, captured_amount = %s, refunded_amount = %s, event_seq = %s,"
                " updated_at = %s WHERE payment_id = %s",
                payment.status, payment.captured_amount, payment.refunded_amount, payment.event_seq, now,
                payment.payment_id,
            )
            operation_id = await self._operation_ids.next()
            entries = self._stage_operation(second, payment, req.kind, operation_id, change.amount, req.reason, now)
            body = self._dumps(view(payment, entries, _MESSAGES[req.kind]))
            if claim_id is not None:
                idempotency.stage_complete(second, claim_id, 200, body, payment.payment_id)
            second.add("COMMIT")
            await second.run(conn)
        return Outcome(200, body)

    async def get(self, merchant_id: str, payment_id: int) -> Outcome:
        """The payment with all its ledger entries, read in one statement (one consistent snapshot)."""
        async with self._pool.acquire() as conn:
            batch = Batch()
            batch.add(
                "SELECT p.payment_id, p.merchant_id, p.amount, p.currency, p.status, p.captured_amount,"
                " p.refunded_amount, p.event_seq, p.created_at, p.updated_at,"
                " l.operation_id, l.account, l.direction, l.amount, l.currency, l.created_at"
                " FROM payment p JOIN ledger_entry l ON l.payment_id = p.payment_id"
                " WHERE p.payment_id = %s AND p.merchant_id = %s ORDER BY l.entry_id",
                payment_id, merchant_id,
            )
            rows = (await batch.run(conn))[0].rows
        if not rows:
            raise not_found(payment_id)
        payment = Payment.from_row(rows[0])
        entries = [ledger.LedgerEntry(int(r[10]), r[11], r[12], int(r[13]), r[14], r[15]) for r in rows]
        return Outcome(200, self._dumps(view(payment, entries, "Payment found")))

    @staticmethod
    def _stage_operation(
        batch: Batch, p: Payment, kind: str, operation_id: int, amount: int, reason: str | None, now: datetime
    ) -> list[ledger.LedgerEntry]:
        """The operation row, its ledger pairs and its outbox event (``p`` as it is after the operation)."""
        batch.add(
            "INSERT INTO payment_operation (operation_id, payment_id, kind, amount, reason, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            operation_id, p.payment_id, kind, amount, reason, now,
        )
        entries = ledger.stage(batch, p.payment_id, operation_id, ledger.postings(kind, amount), p.currency, now)
        topic, event_type = outbox.EVENTS[kind]
        outbox.stage(batch, payment_id=p.payment_id, merchant_id=p.merchant_id, topic=topic, event_type=event_type,
                     operation_id=operation_id, amount=amount, currency=p.currency, sequence=p.event_seq,
                     occurred_at=now)
        return entries

    @staticmethod
    async def _claim_failed(conn: asyncmy.Connection, exc: BatchError, index: int | None, claim: Claim) -> Outcome:
        if not idempotency.is_claim_failure(exc, index):
            await rollback_quietly(conn)
            raise exc
        stored = await idempotency.settle_failed_claim(conn, exc, claim)
        return Outcome(stored.status, stored.body, replayed=True)

    async def _finish_refused(
        self, conn: asyncmy.Connection, error: ApiError, claim_id: int | None, payment_id: int
    ) -> Outcome:
        """A business refusal (404, 409): nothing changed; an idempotent request stores the refusal as its answer."""
        body = self._dumps(error.body())
        batch = Batch()
        if claim_id is None:
            batch.add("ROLLBACK")
        else:
            idempotency.stage_complete(batch, claim_id, error.status, body, None)
            batch.add("COMMIT")
        await batch.run(conn)
        return Outcome(error.status, body)
