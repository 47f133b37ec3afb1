"""Settlement: computed from the payment's committed state in the primary, so event order never matters.

Whatever event of a payment arrives (authorized, captured, refunded, cancelled; in any order, any number of times),
the consumer locks the payment row and brings its settlements up to date with its committed operations:

- every CAPTURE operation gets one ``settlement`` row (kind CAPTURE, +amount): partial captures make several;
- every REFUND operation gets one negative adjustment (kind ADJUSTMENT, -amount); nothing is ever edited.

``UNIQUE (operation_id, kind)`` makes a second application impossible. Each new row posts a balanced ledger pair
and a ``payment.settled`` event through the outbox, in the same transaction:

    CAPTURE    c   merchant_payable    / merchant_settlement  c   (what we owe the merchant moves to a payout)
    ADJUSTMENT r   merchant_settlement / merchant_payable     r   (a refund after settlement claws it back)

so per payment Σ settled_amount = captured - refunded once the consumer has caught up: the reconciliation check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from payapp import ledger, outbox
from payapp.db import Batch
from payapp.events import SETTLED

MERCHANT_PAYABLE = "merchant_payable"
MERCHANT_SETTLEMENT = "merchant_settlement"

# Locks the payment and reads what settlement needs, as statements of the caller's batch (after BEGIN).
LOCK_PAYMENT = "SELECT merchant_id, currency, event_seq FROM payment WHERE payment_id = %s FOR UPDATE"
UNSETTLED_OPERATIONS = (
    "SELECT o.operation_id, o.kind, o.amount FROM payment_operation o"
    " LEFT JOIN settlement s ON s.operation_id = o.operation_id"
    " AND s.kind = IF(o.kind = 'CAPTURE', 'CAPTURE', 'ADJUSTMENT')"
    " WHERE o.payment_id = %s AND o.kind IN ('CAPTURE', 'REFUND') AND s.settlement_id IS NULL"
    " ORDER BY o.kind = 'REFUND', o.operation_id"
)


def unsettled_operations_in(n: int) -> str:
    """UNSETTLED_OPERATIONS for ``n`` payments at once, with payment_id as the first column."""
    return (
        "SELECT o.payment_id, o.operation_id, o.kind, o.amount FROM payment_operation o"
        " LEFT JOIN settlement s ON s.operation_id = o.operation_id"
        " AND s.kind = IF(o.kind = 'CAPTURE', 'CAPTURE', 'ADJUSTMENT')"
        f" WHERE o.payment_id IN ({','.join(['%s'] * n)}) AND o.kind IN ('CAPTURE', 'REFUND')"
        " AND s.settlement_id IS NULL ORDER BY o.payment_id, o.kind = 'REFUND', o.operation_id"
    )


_INSERT = (
    "INSERT INTO settlement (payment_id, merchant_id, operation_id, kind, settled_amount, currency, event_id,"
    " settled_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class Locked:
    """The locked payment row: what settlement needs of it."""

    payment_id: int
    merchant_id: str
    currency: str
    event_seq: int


@dataclass(frozen=True)
class NewSettlement:
    operation_id: int
    kind: str
    settled_amount: int
    event_id: str


def locked(payment_id: int, rows: tuple[tuple[Any, ...], ...]) -> Locked | None:
    return Locked(payment_id, rows[0][0], rows[0][1], int(rows[0][2])) if rows else None


def stage(
    batch: Batch, p: Locked, unsettled: tuple[tuple[Any, ...], ...], trigger_event_id: str, now: datetime
) -> list[NewSettlement]:
    """Add the settlements, ledger pairs and payment.settled events ``unsettled`` calls for to ``batch``."""
    out: list[NewSettlement] = []
    seq = p.event_seq
    for operation_id, kind, amount in unsettled:
        operation_id, amount = int(operation_id), int(amount)
        if kind == "CAPTURE":
            s_kind, signed, pair = "CAPTURE", amount, ledger.Posting(MERCHANT_PAYABLE, MERCHANT_SETTLEMENT, amount)
            event_type = "PaymentSettled"
        else:
            s_kind, signed, pair = "ADJUSTMENT", -amount, ledger.Posting(MERCHANT_SETTLEMENT, MERCHANT_PAYABLE,
                                                                          amount)
            event_type = "PaymentSettlementAdjusted"
        batch.add(_INSERT, p.payment_id, p.merchant_id, operation_id, s_kind, signed, p.currency, trigger_event_id,
                  now)
        ledger.stage(batch, p.payment_id, operation_id, [pair], p.currency, now)
        seq += 1
        event_id = outbox.stage(batch, payment_id=p.payment_id, merchant_id=p.merchant_id, topic=SETTLED,
                                event_type=event_type, operation_id=operation_id, amount=signed,
                                currency=p.currency, sequence=seq, occurred_at=now)
        out.append(NewSettlement(operation_id, s_kind, signed, event_id))
    if seq != p.event_seq:
        batch.add("UPDATE payment SET event_seq = %s WHERE payment_id = %s", seq, p.payment_id)
    return out
