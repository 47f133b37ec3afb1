"""Rules that must hold under concurrency: one payment per idempotency key, capture/refund bounds, the in-progress
claim and its lease, and a balanced ledger after any mix of operations (property-based)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncmy
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payapp import db
from payapp.settings import Settings
from tests.app.conftest import AppDatabase, app_client, merchant

Client = TestClient[Any, Any]


async def _post(client: Client, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, json=body, headers=headers)
    return resp.status, await resp.json()


async def test_fifty_identical_authorizations_make_one_payment(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    request = {"merchantId": m, "amount": 7_000, "currency": "KRW", "idempotencyKey": "same-order"}
    results = await asyncio.gather(*(_post(client, "/payments/authorize", request) for _ in range(50)))
    ok = [body for status, body in results if status == 200]
    busy = [body for status, body in results if status == 409]
    assert len(ok) + len(busy) == 50, results
    assert ok and all(body["code"] == "REQUEST_IN_PROGRESS" for body in busy)
    assert len({body["paymentId"] for body in ok}) == 1
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 1
    pid = ok[0]["paymentId"]
    assert app_db.scalar(f"SELECT COUNT(*) FROM ledger_entry WHERE payment_id = {pid}") == 2
    assert app_db.scalar(f"SELECT COUNT(*) FROM outbox_event WHERE payment_id = {pid}") == 1
    # After the dust settles every retry is a replay.
    status, body = await _post(client, "/payments/authorize", request)
    assert (status, body["paymentId"]) == (200, pid)


async def test_fifty_identical_captures_with_a_key_capture_once(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    _, auth = await _post(client, "/payments/authorize",
                          {"merchantId": m, "amount": 10_000, "currency": "KRW", "idempotencyKey": "k"})
    pid = auth["paymentId"]
    results = await asyncio.gather(*(
        _post(client, f"/payments/capture/{pid}", {"merchantId": m, "amount": 100}, {"Idempotency-Key": "cap-1"})
        for _ in range(50)))
    assert {status for status, _ in results} <= {200, 409}
    assert app_db.scalar(f"SELECT captured_amount FROM payment WHERE payment_id = {pid}") == 100


async def test_concurrent_captures_and_refunds_never_exceed_their_bounds(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    _, auth = await _post(client, "/payments/authorize",
                          {"merchantId": m, "amount": 10_000, "currency": "KRW", "idempotencyKey": "bounds"})
    pid = auth["paymentId"]
    captures = await asyncio.gather(*(
        _post(client, f"/payments/capture/{pid}", {"merchantId": m, "amount": 700}) for _ in range(30)))
    assert sum(1 for status, _ in captures if status == 200) == 14  # 14 * 700 = 9800 <= 10000 < 15 * 700
    assert {body["code"] for status, body in captures if status != 200} == {"INVALID_STATE"}
    refunds = await asyncio.gather(*(
        _post(client, f"/payments/refund/{pid}", {"merchantId": m, "amount": 1_000, "reason": "r"})
        for _ in range(30)))
    assert sum(1 for status, _ in refunds if status == 200) == 9  # 9 * 1000 <= 9800 < 10 * 1000
    row = app_db.rows(f"SELECT amount, captured_amount, refunded_amount, status, event_seq FROM payment"
                      f" WHERE payment_id = {pid}")[0]
    assert row == ["10000", "9800", "9000", "PARTIALLY_REFUNDED", str(1 + 14 + 9)]
    sums = app_db.rows(f"SELECT kind, SUM(amount), COUNT(*) FROM payment_operation WHERE payment_id = {pid}"
                       " GROUP BY kind ORDER BY kind")
    assert sums == [["AUTHORIZE", "10000", "1"], ["CAPTURE", "9800", "14"], ["REFUND", "9000", "9"]]
    sequences = [int(r[0]) for r in app_db.rows(
        f"SELECT `sequence` FROM outbox_event WHERE payment_id = {pid} ORDER BY id")]
    assert sequences == list(range(1, 25))  # gapless, in commit order


async def _claim_in_open_transaction(settings: Settings, m: str, key: str, body: dict[str, Any]) -> asyncmy.Connection:
    """What an in-flight authorize holds: its claim, inserted in a transaction that has not committed."""
    from payapp import idempotency

    conn = await db.connect(settings.db)
    await db.execute(conn, f"SET SESSION idle_transaction_timeout = {settings.idempotency_lease_seconds}")
    claim = idempotency.claim_for(m, "authorize", key, {"amount": body["amount"], "currency": body["currency"]})
    batch = db.Batch()
    batch.add("BEGIN")
    idempotency.stage_claim(batch, claim, settings.idempotency_lease_seconds, db.utcnow())
    await batch.run(conn)
    return conn


async def test_a_request_in_progress_is_409_and_a_dead_one_frees_its_key(client: Client, settings: Settings) -> None:
    m = merchant()
    body = {"merchantId": m, "amount": 1_234, "currency": "KRW", "idempotencyKey": "in-flight"}
    holder = await _claim_in_open_transaction(settings, m, "in-flight", body)
    status, answer = await _post(client, "/payments/authorize", body)
    assert (status, answer["code"]) == (409, "REQUEST_IN_PROGRESS")
    holder.close()  # the request's process dies: MariaDB rolls its claim back
    await asyncio.sleep(0.2)
    status, answer = await _post(client, "/payments/authorize", body)
    assert (status, answer["status"]) == (200, "REQUESTED")


async def test_a_hung_request_loses_its_claim_when_the_lease_ends(app_db: AppDatabase,
                                                                   payapp_env: dict[str, str]) -> None:
    short = Settings.from_env({**payapp_env, "PAYAPP_IDEMPOTENCY_LEASE_SECONDS": "1"})
    m = merchant()
    body = {"merchantId": m, "amount": 999, "currency": "KRW", "idempotencyKey": "hung"}
    holder = await _claim_in_open_transaction(short, m, "hung", body)  # never commits, never closes
    async with app_client(short) as client:
        status, answer = await _post(client, "/payments/authorize", body)
        assert status == 409
        await asyncio.sleep(2.5)  # idle_transaction_timeout = lease: MariaDB ends the hung transaction
        status, answer = await _post(client, "/payments/authorize", body)
        assert (status, answer["status"]) == (200, "REQUESTED")
    holder.close()
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 1


# --- the ledger always balances (property-based) ----------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("capture"), st.integers(0, 3), st.one_of(st.none(), st.integers(1, 6_000))),
    st.tuples(st.just("refund"), st.integers(0, 3), st.one_of(st.none(), st.integers(1, 6_000))),
    st.tuples(st.just("void"), st.integers(0, 3), st.none()),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(amounts=st.lists(st.integers(1, 10_000), min_size=1, max_size=4), ops=st.lists(_op, max_size=12))
async def test_ledger_balances_after_any_mix_of_operations(
    client: Client, app_db: AppDatabase, amounts: list[int], ops: list[tuple[str, int, int | None]]
) -> None:
    m = merchant()
    pids = []
    for amount in amounts:
        _, body = await _post(client, "/payments/authorize", {"merchantId": m, "amount": amount, "currency": "KRW",
                                                              "idempotencyKey": uuid.uuid4().hex})
        pids.append(body["paymentId"])
    # Fire the operations concurrently: each is accepted or refused as a whole.
    calls = []
    for action, index, amount in ops:
        payload: dict[str, Any] = {"merchantId": m}
        if amount is not None:
            payload["amount"] = amount
        if action == "refund":
            payload["reason"] = "property"
        calls.append(_post(client, f"/payments/{action}/{pids[index % len(pids)]}", payload))
    for status, body in await asyncio.gather(*calls):
        assert status == 200 or body["code"] == "INVALID_STATE", body

    ids = ",".join(str(p) for p in pids)
    debit, credit = app_db.rows(
        "SELECT IFNULL(SUM(IF(direction = 'DEBIT', amount, 0)), 0),"
        f" IFNULL(SUM(IF(direction = 'CREDIT', amount, 0)), 0) FROM ledger_entry WHERE payment_id IN ({ids})")[0]
    assert debit == credit
    # Every operation's entries balance on their own, and account balances match the payment's amounts.
    assert app_db.rows(
        f"SELECT operation_id FROM ledger_entry WHERE payment_id IN ({ids}) GROUP BY operation_id"
        " HAVING SUM(IF(direction = 'DEBIT', amount, -amount)) <> 0") == []
    for pid in pids:
        resp = await client.get(f"/payments/{pid}?merchantId={m}")
        p = json.loads(await resp.text())
        balance: dict[str, int] = {}
        for e in p["ledgerEntries"]:
            balance[e["account"]] = balance.get(e["account"], 0) + (e["amount"] if e["direction"] == "DEBIT"
                                                                    else -e["amount"])
        hold = 0 if p["status"] == "CANCELLED" else p["amount"] - p["capturedAmount"]
        assert balance.get("customer_authorized", 0) == hold
        assert balance.get("authorization_pending", 0) == -hold
        assert balance.get("acquirer_receivable", 0) == p["capturedAmount"] - p["refundedAmount"]
        assert balance.get("merchant_payable", 0) == -(p["capturedAmount"] - p["refundedAmount"])
        assert 0 <= p["refundedAmount"] <= p["capturedAmount"] <= p["amount"]
