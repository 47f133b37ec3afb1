"""The transactional outbox: an event row written in the same transaction as the state change it describes.

The relay (a later module) publishes unpublished rows (``published_at IS NULL``, in ``id`` order) to Kafka. Each
event carries the payment's next sequence number (``payment.event_seq``, incremented under the payment's row lock)
so consumers can order and de-duplicate per payment.

Payload (JSON, schemaVersion 1): eventId, type, schemaVersion, paymentId, merchantId, operationId, amount (the
operation's amount), currency, sequence, occurredAt (ISO-8601 UTC).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncmy
import orjson

from payapp import db
from payapp.db import Batch, iso, utcnow

SCHEMA_VERSION = 1

# Operation kind -> (topic, event type).
EVENTS: dict[str, tuple[str, str]] = {
    "AUTHORIZE": ("payment.authorized", "PaymentAuthorized"),
    "CAPTURE": ("payment.captured", "PaymentCaptured"),
    "REFUND": ("payment.refunded", "PaymentRefunded"),
    "VOID": ("payment.cancelled", "PaymentCancelled"),
}

_INSERT = (
    "INSERT INTO outbox_event (event_id, topic, event_type, payment_id, merchant_id, `sequence`, payload, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


def stage(
    batch: Batch,
    *,
    payment_id: int,
    merchant_id: str,
    topic: str,
    event_type: str,
    operation_id: int,
    amount: int,
    currency: str,
    sequence: int,
    occurred_at: datetime,
) -> str:
    """Add the event's INSERT to ``batch``; returns its event id.

    ``sequence`` must be the value the caller has just set ``payment.event_seq`` to in the same transaction.
    """
    event_id = str(uuid.uuid4())
    payload = orjson.dumps({
        "eventId": event_id,
        "type": event_type,
        "schemaVersion": SCHEMA_VERSION,
        "paymentId": payment_id,
        "merchantId": merchant_id,
        "operationId": operation_id,
        "amount": amount,
        "currency": currency,
        "sequence": sequence,
        "occurredAt": iso(occurred_at),
    }).decode()
    batch.add(_INSERT, event_id, topic, event_type, payment_id, merchant_id, sequence, payload, occurred_at)
    return event_id


async def add(
    conn: asyncmy.Connection,
    payment_id: int,
    merchant_id: str,
    topic: str,
    event_type: str,
    operation_id: int,
    amount: int,
    currency: str,
) -> str:
    """Increment ``payment.event_seq`` and write the event, in the caller's transaction; returns the event id."""
    bump = await db.execute(
        conn, "UPDATE payment SET event_seq = LAST_INSERT_ID(event_seq + 1) WHERE payment_id = %s", payment_id
    )
    if bump.rowcount != 1:
        raise LookupError(f"payment {payment_id} does not exist")
    batch = Batch()
    event_id = stage(
        batch, payment_id=payment_id, merchant_id=merchant_id, topic=topic, event_type=event_type,
        operation_id=operation_id, amount=amount, currency=currency, sequence=bump.lastrowid, occurred_at=utcnow(),
    )
    await batch.run(conn)
    return event_id
