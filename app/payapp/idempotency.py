"""Stripe-style idempotency: the same (merchant, scope, key) with the same parameters gets the first response again.

A request *claims* its key by inserting its row as the first statement of its own transaction and completes it
with the exact response (status and body bytes) in the same commit as the state change: an ``IN_PROGRESS`` row
updated to ``COMPLETED`` (capture, refund, void), or, when the response is known before anything is sent
(authorize), a row inserted ``COMPLETED`` straight away. Until the commit nobody else sees the row; its locked
unique-index entry is the in-progress marker. So the response and the money movement are stored atomically, and
exactly one of any number of identical concurrent requests does the work:

- while the claiming transaction runs, the unique index row is locked; a second claim does not wait
  (``innodb_lock_wait_timeout = 0`` for that one statement) and gets ``REQUEST_IN_PROGRESS`` (409);
- once it committed, a second claim hits the unique key: same parameters -> replay, different -> 422;
- the claim is a lease: if the request dies its connection closes and MariaDB rolls the claim back at once; if it
  hangs, MariaDB's ``idle_transaction_timeout`` (PAYAPP_IDEMPOTENCY_LEASE_SECONDS, the ``locked_until`` recorded
  in the row) ends the transaction. Either way the key is free again and a retry does the work.

Only responses of requests that reached the work are stored (200, and the 404/409 business outcomes); validation
failures, 401, 429 and server errors are not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncmy
import orjson

from payapp.db import ER_DUP_ENTRY, ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT, Batch, BatchError
from payapp.errors import ApiError


@dataclass(frozen=True)
class Claim:
    merchant_id: str
    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class Stored:
    status: int
    body: bytes


def claim_for(merchant_id: str, scope: str, key: str, params: dict[str, Any]) -> Claim:
    """The claim of one request; ``params`` are the parameters that must match for a replay."""
    digest = hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Claim(merchant_id, scope, key, digest)


def stage_claim(
    batch: Batch, claim: Claim, lease_seconds: int, now: datetime, response: Stored | None = None,
    payment_id: int | None = None,
) -> int:
    """Add the claim's INSERT to ``batch`` (which must have begun a transaction); returns its statement index.

    With ``response`` the row is inserted complete (for ``payment_id``) and needs no ``stage_complete``.
    """
    return batch.add(
        "SET STATEMENT innodb_lock_wait_timeout = 0 FOR "
        "INSERT INTO idempotency_key (merchant_id, scope, idempotency_key, request_hash, status, payment_id,"
        " response_status, response_body, locked_until, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        claim.merchant_id, claim.scope, claim.key, claim.request_hash,
        "COMPLETED" if response else "IN_PROGRESS", payment_id,
        response.status if response else None, response.body.decode() if response else None,
        now + timedelta(seconds=lease_seconds), now,
    )


def stage_complete(batch: Batch, claim_id: int, status: int, body: bytes, payment_id: int | None) -> None:
    """Store the response in the claimed row, in the same transaction as the work."""
    batch.add(
        "UPDATE idempotency_key SET status = 'COMPLETED', response_status = %s, response_body = %s, payment_id = %s"
        " WHERE id = %s",
        status, body.decode(), payment_id, claim_id,
    )


#: The unique key a second claim of the same (merchant, scope, key) collides with (migration 001).
CLAIM_KEY = "uq_idempotency"


def is_claim_failure(exc: BatchError, claim_index: int | None) -> bool:
    """Whether ``exc`` is the claim's INSERT being refused (taken key, or a claim still in progress).

    ``claim_index`` None: the claim ran inside a compound statement (``Batch.compound``), which does not say which
    statement failed. A duplicate is then the claim's when MariaDB names the claim's unique key (the other rows of
    authorize carry fresh ids only); a lock wait or deadlock is the claim's, the only statement of authorize that
    can wait for another transaction (the others insert new rows and check foreign keys against its own payment).
    """
    if exc.code not in (ER_DUP_ENTRY, ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK):
        return False
    if claim_index is not None:
        return exc.index == claim_index
    return exc.code != ER_DUP_ENTRY or exc.message.endswith(f"for key '{CLAIM_KEY}'")


async def settle_failed_claim(conn: asyncmy.Connection, exc: BatchError, claim: Claim) -> Stored:
    """After the claim's INSERT failed: roll back, then the stored response to replay, or 409 / 422."""
    batch = Batch()
    batch.add("ROLLBACK")
    lookup = batch.add(
        "SELECT request_hash, status, response_status, response_body FROM idempotency_key"
        " WHERE merchant_id = %s AND scope = %s AND idempotency_key = %s",
        claim.merchant_id, claim.scope, claim.key,
    )
    rows = (await batch.run(conn))[lookup].rows
    in_progress = ApiError(409, "REQUEST_IN_PROGRESS",
                           "a request with this idempotency key is still in progress; retry later")
    if exc.code != ER_DUP_ENTRY or not rows:
        # Lock wait: the first request is still running (or it just rolled back: a retry will do the work).
        raise in_progress
    request_hash, status, response_status, response_body = rows[0]
    if request_hash != claim.request_hash:
        raise ApiError(422, "IDEMPOTENCY_CONFLICT",
                       "this idempotency key was already used with different parameters")
    if status != "COMPLETED":
        raise in_progress
    return Stored(int(response_status), response_body.encode())
