"""The double-entry ledger: every money movement is a DEBIT and a CREDIT of the same amount.

``ledger_entry`` is append-only (database triggers refuse UPDATE and DELETE); a correction is a new balanced pair.
Accounts (docs/data-model.md explains them with their expected balances):

    customer_authorized    funds held on the customer's payment method by an authorization (debit-normal)
    authorization_pending  the matching obligation, released by capture or void (credit-normal)
    acquirer_receivable    captured funds the acquirer owes us (debit-normal)
    merchant_payable       captured funds we owe the merchant (credit-normal)

    AUTHORIZE a   customer_authorized   / authorization_pending  a
    CAPTURE   c   authorization_pending / customer_authorized    c   (release that much of the hold)
                  acquirer_receivable   / merchant_payable       c   (the money moves)
    REFUND    r   merchant_payable      / acquirer_receivable    r
    VOID      v   authorization_pending / customer_authorized    v   (release the rest of the hold)

``post`` writes one balanced pair in its own round trip (settlement reuses it); ``stage`` adds pairs to a
``Batch`` so the API writes them together with the rest of an operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncmy

from payapp.db import Batch, iso, utcnow


class Account(StrEnum):
    CUSTOMER_AUTHORIZED = "customer_authorized"
    AUTHORIZATION_PENDING = "authorization_pending"
    ACQUIRER_RECEIVABLE = "acquirer_receivable"
    MERCHANT_PAYABLE = "merchant_payable"


@dataclass(frozen=True)
class Posting:
    """One balanced pair: ``amount`` debited to one account and credited to another."""

    debit: str
    credit: str
    amount: int


def postings(kind: str, amount: int) -> list[Posting]:
    """The pairs an API operation (AUTHORIZE, CAPTURE, REFUND, VOID) of ``amount`` writes."""
    hold = Posting(Account.CUSTOMER_AUTHORIZED, Account.AUTHORIZATION_PENDING, amount)
    release = Posting(Account.AUTHORIZATION_PENDING, Account.CUSTOMER_AUTHORIZED, amount)
    if kind == "AUTHORIZE":
        return [hold]
    if kind == "CAPTURE":
        return [release, Posting(Account.ACQUIRER_RECEIVABLE, Account.MERCHANT_PAYABLE, amount)]
    if kind == "REFUND":
        return [Posting(Account.MERCHANT_PAYABLE, Account.ACQUIRER_RECEIVABLE, amount)]
    if kind == "VOID":
        return [release]
    raise ValueError(f"no postings for operation kind {kind!r}")


@dataclass(frozen=True)
class LedgerEntry:
    operation_id: int
    account: str
    direction: str
    amount: int
    currency: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "operationId": self.operation_id,
            "account": self.account,
            "direction": self.direction,
            "amount": self.amount,
            "currency": self.currency,
            "createdAt": iso(self.created_at),
        }


_INSERT = (
    "INSERT INTO ledger_entry (payment_id, operation_id, account, direction, amount, currency, created_at) VALUES "
)
_ROW = "(%s, %s, %s, %s, %s, %s, %s)"


def stage(
    batch: Batch, payment_id: int, operation_id: int, pairs: list[Posting], currency: str, created_at: datetime
) -> list[LedgerEntry]:
    """Add one INSERT of every pair's two entries to ``batch``; returns the entries it will write."""
    entries: list[LedgerEntry] = []
    args: list[Any] = []
    for pair in pairs:
        if pair.amount <= 0 or pair.debit == pair.credit:
            raise ValueError(f"not a valid posting: {pair}")
        for account, direction in ((pair.debit, "DEBIT"), (pair.credit, "CREDIT")):
            entries.append(LedgerEntry(operation_id, str(account), direction, pair.amount, currency, created_at))
            args += [payment_id, operation_id, str(account), direction, pair.amount, currency, created_at]
    batch.add(_INSERT + ", ".join([_ROW] * len(entries)), *args)
    return entries


async def post(
    conn: asyncmy.Connection,
    payment_id: int,
    operation_id: int,
    debit_account: str,
    credit_account: str,
    amount: int,
    currency: str,
) -> list[LedgerEntry]:
    """Write one balanced pair (debit ``debit_account``, credit ``credit_account``) in the caller's transaction."""
    batch = Batch()
    entries = stage(batch, payment_id, operation_id, [Posting(debit_account, credit_account, amount)], currency,
                    utcnow())
    await batch.run(conn)
    return entries
