"""The API against real MariaDB and Redis: every endpoint's happy path, every error code, the stored rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.app.conftest import AppDatabase, merchant

Client = TestClient[Any, Any]


async def call(client: Client, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    resp = await client.request(method, path, data=data, headers=headers)
    text = await resp.text()
    assert "Traceback" not in text
    payload = json.loads(text) if resp.content_type == "application/json" else {"text": text}
    return resp.status, payload, resp.headers


async def authorize(client: Client, m: str, amount: int = 10_000, key: str | None = None,
                    currency: str = "KRW") -> dict[str, Any]:
    status, body, _ = await call(client, "POST", "/payments/authorize", {
        "merchantId": m, "amount": amount, "currency": currency, "idempotencyKey": key or f"k-{m}-{amount}"})
    assert status == 200, body
    return body


def assert_error(status: int, body: dict[str, Any], want_status: int, code: str) -> None:
    assert (status, body.get("code")) == (want_status, code), body
    assert set(body) <= {"code", "message", "paymentId"} and body["message"]


# --- happy paths -----------------------------------------------------------------------------------------------


async def test_authorize_returns_the_payment_and_its_ledger_pair(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    body = await authorize(client, m, 15_000)
    assert isinstance(body["paymentId"], int) and body["paymentId"] > 0
    assert (body["status"], body["amount"], body["currency"]) == ("REQUESTED", 15_000, "KRW")
    assert body["createdAt"].endswith("Z") and body["message"] == "Payment authorized"
    entries = body["ledgerEntries"]
    assert [(e["account"], e["direction"], e["amount"]) for e in entries] == [
        ("customer_authorized", "DEBIT", 15_000), ("authorization_pending", "CREDIT", 15_000)]
    pid = body["paymentId"]
    event = app_db.rows(f"SELECT topic, event_type, `sequence`, payload FROM outbox_event WHERE payment_id = {pid}")
    assert len(event) == 1 and event[0][:3] == ["payment.authorized", "PaymentAuthorized", "1"]
    payload = json.loads(event[0][3])
    assert set(payload) == {"eventId", "type", "schemaVersion", "paymentId", "merchantId", "operationId", "amount",
                            "currency", "sequence", "occurredAt"}
    assert (payload["paymentId"], payload["merchantId"], payload["amount"], payload["sequence"]) == (pid, m, 15_000, 1)
    assert app_db.scalar(f"SELECT event_seq FROM payment WHERE payment_id = {pid}") == 1


async def test_get_shows_current_state_and_all_entries(client: Client) -> None:
    m = merchant()
    pid = (await authorize(client, m, 9_000))["paymentId"]
    await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m, "amount": 4_000})
    status, body, _ = await call(client, "GET", f"/payments/{pid}?merchantId={m}")
    assert status == 200
    assert (body["status"], body["capturedAmount"], body["refundedAmount"]) == ("COMPLETED", 4_000, 0)
    assert len(body["ledgerEntries"]) == 2 + 4
    assert sum(e["amount"] for e in body["ledgerEntries"] if e["direction"] == "DEBIT") == \
        sum(e["amount"] for e in body["ledgerEntries"] if e["direction"] == "CREDIT")


async def test_partial_captures_then_partial_and_full_refunds(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    pid = (await authorize(client, m, 10_000))["paymentId"]
    status, body, _ = await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m, "amount": 6_000})
    assert (status, body["status"], body["capturedAmount"]) == (200, "COMPLETED", 6_000)
    assert [(e["account"], e["direction"]) for e in body["ledgerEntries"]] == [
        ("authorization_pending", "DEBIT"), ("customer_authorized", "CREDIT"),
        ("acquirer_receivable", "DEBIT"), ("merchant_payable", "CREDIT")]
    status, body, _ = await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m})  # the rest
    assert (status, body["capturedAmount"]) == (200, 10_000)
    status, body, _ = await call(client, "POST", f"/payments/refund/{pid}",
                                 {"merchantId": m, "amount": 3_000, "reason": "one item returned"})
    assert (status, body["status"], body["refundedAmount"]) == (200, "PARTIALLY_REFUNDED", 3_000)
    status, body, _ = await call(client, "POST", f"/payments/refund/{pid}", {"merchantId": m, "reason": "rest"})
    assert (status, body["status"], body["refundedAmount"]) == (200, "REFUNDED", 10_000)
    ops = app_db.rows(f"SELECT kind, amount, IFNULL(reason, '') FROM payment_operation WHERE payment_id = {pid}"
                      " ORDER BY operation_id")
    assert ops == [["AUTHORIZE", "10000", ""], ["CAPTURE", "6000", ""], ["CAPTURE", "4000", ""],
                   ["REFUND", "3000", "one item returned"], ["REFUND", "7000", "rest"]]
    topics = app_db.rows(f"SELECT topic, `sequence` FROM outbox_event WHERE payment_id = {pid} ORDER BY id")
    assert topics == [["payment.authorized", "1"], ["payment.captured", "2"], ["payment.captured", "3"],
                      ["payment.refunded", "4"], ["payment.refunded", "5"]]


async def test_void_cancels_an_uncaptured_authorization(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    pid = (await authorize(client, m, 5_000))["paymentId"]
    status, body, _ = await call(client, "POST", f"/payments/void/{pid}", {"merchantId": m})
    assert (status, body["status"]) == (200, "CANCELLED")
    assert [(e["account"], e["direction"], e["amount"]) for e in body["ledgerEntries"]] == [
        ("authorization_pending", "DEBIT", 5_000), ("customer_authorized", "CREDIT", 5_000)]
    assert app_db.rows(f"SELECT topic FROM outbox_event WHERE payment_id = {pid} ORDER BY id")[-1] == [
        "payment.cancelled"]


async def test_health_checks_db_and_redis(client: Client) -> None:
    status, body, _ = await call(client, "GET", "/health")
    assert (status, body) == (200, {"status": "ok", "db": "ok", "redis": "ok"})


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "JSON object"),
    (b'"just a string"', "JSON object"),
    (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    (b'{"merchantId": "m", "amount": 100, "currency": "KRW"}', "idempotencyKey: required"),
    (b'{"amount": 100, "currency": "KRW", "idempotencyKey": "k"}', "merchantId: required"),
    (b'{"merchantId": "m", "currency": "KRW", "idempotencyKey": "k"}', "amount: required"),
    (b'{"merchantId": "m", "amount": "100", "currency": "KRW", "idempotencyKey": "k"}', "amount"),
    (b'{"merchantId": "m", "amount": 100.0, "currency": "KRW", "idempotencyKey": "k"}', "amount"),
    (b'{"merchantId": "m", "amount": true, "currency": "KRW", "idempotencyKey": "k"}', "amount"),
    (b'{"merchantId": "m", "amount": 0, "currency": "KRW", "idempotencyKey": "k"}', "amount"),
    (b'{"merchantId": "m", "amount": -5, "currency": "KRW", "idempotencyKey": "k"}', "amount"),
    (b'{"merchantId": "m", "amount": 1e400, "currency": "KRW", "idempotencyKey": "k"}', ""),
    (b'{"merchantId": "m", "amount": 99999999999999999999999, "currency": "KRW", "idempotencyKey": "k"}', ""),
    (b'{"merchantId": "m", "amount": 100, "currency": "XYZ", "idempotencyKey": "k"}', "currency"),
    (b'{"merchantId": "m", "amount": 100, "currency": "KR", "idempotencyKey": "k"}', "currency"),
    (b'{"merchantId": "m", "amount": 100, "currency": 410, "idempotencyKey": "k"}', "currency"),
    (b'{"merchantId": "", "amount": 100, "currency": "KRW", "idempotencyKey": "k"}', "merchantId"),
    (b'{"merchantId": "' + b"m" * 33 + b'", "amount": 100, "currency": "KRW", "idempotencyKey": "k"}', "merchantId"),
    (b'{"merchantId": "m", "amount": 100, "currency": "KRW", "idempotencyKey": "' + b"k" * 65 + b'"}',
     "idempotencyKey"),
    (b'{"merchantId": "m\\u0000", "amount": 100, "currency": "KRW", "idempotencyKey": "k"}', "merchantId"),
    (b'{"merchantId": "m\\ud800", "amount": 100, "currency": "KRW", "idempotencyKey": "k"}', ""),
    (b'{"merchantId": ["m"], "amount": 100, "currency": "KRW", "idempotencyKey": "k"}', "merchantId"),
    (b"\xff\xfe{}", ""),
])
async def test_bad_input_is_a_400_never_a_5xx(client: Client, raw: bytes, fragment: str) -> None:
    status, body, _ = await call(client, "POST", "/payments/authorize", raw=raw)
    assert_error(status, body, 400, "VALIDATION_ERROR")
    assert fragment in body["message"]


async def test_bad_input_on_capture_refund_void_and_get(client: Client) -> None:
    m = merchant()
    pid = (await authorize(client, m))["paymentId"]
    cases = [
        ("POST", f"/payments/capture/{pid}", {"merchantId": m, "amount": "all"}),
        ("POST", f"/payments/capture/{pid}", {"merchantId": m, "amount": 0}),
        ("POST", f"/payments/refund/{pid}", {"merchantId": m, "amount": 10}),  # reason is required
        ("POST", f"/payments/refund/{pid}", {"merchantId": m, "reason": "r" * 129}),
        ("POST", f"/payments/void/{pid}", {}),
        ("POST", "/payments/capture/abc", {"merchantId": m}),
        ("GET", f"/payments/{pid}", None),  # merchantId is required to scope the read
        ("GET", "/payments/-1?merchantId=m", None),
    ]
    for method, path, payload in cases:
        status, body, _ = await call(client, method, path, payload)
        assert_error(status, body, 400, "VALIDATION_ERROR")
    status, body, _ = await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m},
                                 headers={"Idempotency-Key": "x" * 65})
    assert_error(status, body, 400, "VALIDATION_ERROR")


async def test_oversized_body_is_413_in_the_error_shape(client: Client) -> None:
    big = json.dumps({"merchantId": "m", "amount": 1, "currency": "KRW", "idempotencyKey": "k",
                      "pad": "x" * 17_000}).encode()
    status, body, _ = await call(client, "POST", "/payments/authorize", raw=big)
    assert_error(status, body, 413, "PAYLOAD_TOO_LARGE")
    # Exactly 16 KB is still accepted as far as size goes (then validated).
    edge = b'{"pad": "' + b"x" * (16 * 1024 - 11) + b'"}'
    assert len(edge) == 16 * 1024
    status, body, _ = await call(client, "POST", "/payments/authorize", raw=edge)
    assert_error(status, body, 400, "VALIDATION_ERROR")


async def test_not_found_covers_unknown_ids_other_merchants_and_routes(client: Client) -> None:
    m, other = merchant(), merchant()
    pid = (await authorize(client, m))["paymentId"]
    for method, path, payload in [
        ("GET", f"/payments/{pid}?merchantId={other}", None),
        ("POST", f"/payments/capture/{pid}", {"merchantId": other}),
        ("POST", f"/payments/refund/{pid}", {"merchantId": other, "reason": "x"}),
        ("POST", f"/payments/void/{pid}", {"merchantId": other}),
        ("GET", f"/payments/999999999?merchantId={m}", None),
        ("GET", f"/payments/{2**64}?merchantId={m}", None),
    ]:
        status, body, _ = await call(client, method, path, payload)
        assert_error(status, body, 404, "NOT_FOUND")
    status, body, _ = await call(client, "GET", "/nowhere")
    assert_error(status, body, 404, "NOT_FOUND")
    status, body, _ = await call(client, "DELETE", "/payments/authorize")
    assert_error(status, body, 405, "METHOD_NOT_ALLOWED")
    # The other merchant's attempts changed nothing.
    status, body, _ = await call(client, "GET", f"/payments/{pid}?merchantId={m}")
    assert body["status"] == "REQUESTED"


async def test_invalid_state_for_each_bound(client: Client) -> None:
    m = merchant()
    pid = (await authorize(client, m, 1_000))["paymentId"]
    checks = [
        ("refund", {"merchantId": m, "amount": 1, "reason": "x"}, "cannot refund a payment in status REQUESTED"),
        ("capture", {"merchantId": m, "amount": 1_001}, "exceeds the uncaptured authorized amount 1000"),
    ]
    for action, payload, message in checks:
        status, body, _ = await call(client, "POST", f"/payments/{action}/{pid}", payload)
        assert_error(status, body, 409, "INVALID_STATE")
        assert body["paymentId"] == pid and message in body["message"]
    await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m, "amount": 400})
    for action, payload, message in [
        ("void", {"merchantId": m}, "cannot void a payment in status COMPLETED"),
        ("capture", {"merchantId": m, "amount": 601}, "exceeds the uncaptured authorized amount 600"),
        ("refund", {"merchantId": m, "amount": 401, "reason": "x"}, "exceeds the captured amount not yet refunded"),
    ]:
        status, body, _ = await call(client, "POST", f"/payments/{action}/{pid}", payload)
        assert_error(status, body, 409, "INVALID_STATE")
        assert message in body["message"]
    await call(client, "POST", f"/payments/refund/{pid}", {"merchantId": m, "reason": "all"})
    status, body, _ = await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m})
    assert_error(status, body, 409, "INVALID_STATE")  # refunded payments are closed for capture
    voided = (await authorize(client, m, 700, key="to-void"))["paymentId"]
    await call(client, "POST", f"/payments/void/{voided}", {"merchantId": m})
    for action in ("capture", "void"):
        status, body, _ = await call(client, "POST", f"/payments/{action}/{voided}", {"merchantId": m})
        assert_error(status, body, 409, "INVALID_STATE")


# --- idempotency ------------------------------------------------------------------------------------------------


async def test_authorize_replays_the_first_response_exactly(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    request = {"merchantId": m, "amount": 2_500, "currency": "KRW", "idempotencyKey": "order-1"}
    first = await client.post("/payments/authorize", json=request)
    again = await client.post("/payments/authorize", json=request)
    assert (first.status, again.status) == (200, 200)
    assert await first.read() == await again.read()
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 1
    # Keys are per merchant and case-sensitive.
    assert (await client.post("/payments/authorize", json={**request, "merchantId": merchant()})).status == 200
    assert (await client.post("/payments/authorize", json={**request, "idempotencyKey": "ORDER-1"})).status == 200
    assert (await client.post("/payments/authorize", json={**request, "idempotencyKey": "order-1 "})).status == 200
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 3


async def test_same_key_different_parameters_is_422(client: Client) -> None:
    m = merchant()
    await authorize(client, m, 1_000, key="k1")
    for change in ({"amount": 1_001}, {"currency": "USD"}):
        status, body, _ = await call(client, "POST", "/payments/authorize",
                                     {"merchantId": m, "amount": 1_000, "currency": "KRW", "idempotencyKey": "k1",
                                      **change})
        assert_error(status, body, 422, "IDEMPOTENCY_CONFLICT")


async def test_validation_failures_are_not_stored(client: Client) -> None:
    m = merchant()
    status, _, _ = await call(client, "POST", "/payments/authorize",
                              {"merchantId": m, "amount": 1_000, "currency": "XXX", "idempotencyKey": "k"})
    assert status == 400
    body = await authorize(client, m, 1_000, key="k")  # the same key now does the work
    assert body["status"] == "REQUESTED"


@pytest.mark.parametrize("action", ["capture", "refund", "void"])
async def test_capture_refund_void_replay_with_idempotency_key(client: Client, app_db: AppDatabase,
                                                               action: str) -> None:
    m = merchant()
    pid = (await authorize(client, m, 10_000))["paymentId"]
    if action == "refund":
        await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m})
    payload: dict[str, Any] = {"merchantId": m}
    if action != "void":
        payload["amount"] = 1_000
    if action == "refund":
        payload["reason"] = "customer asked"
    headers = {"Idempotency-Key": f"{action}-1"}
    first = await client.post(f"/payments/{action}/{pid}", json=payload, headers=headers)
    again = await client.post(f"/payments/{action}/{pid}", json=payload, headers=headers)
    assert (first.status, again.status) == (200, 200)
    assert await first.read() == await again.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    kind = action.upper()
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment_operation WHERE payment_id = {pid} AND kind = '{kind}'") == 1
    if action != "void":
        status, body, _ = await call(client, "POST", f"/payments/{action}/{pid}", {**payload, "amount": 2_000},
                                     headers=headers)
        assert_error(status, body, 422, "IDEMPOTENCY_CONFLICT")
    # Without the header a retry is a new operation (that is what the header is for).
    if action == "capture":
        status, body, _ = await call(client, "POST", f"/payments/capture/{pid}", payload)
        assert (status, body["capturedAmount"]) == (200, 2_000)


async def test_a_refused_operation_is_replayed_as_refused(client: Client) -> None:
    m = merchant()
    pid = (await authorize(client, m, 1_000))["paymentId"]
    headers = {"Idempotency-Key": "refund-too-early"}
    first = await client.post(f"/payments/refund/{pid}", json={"merchantId": m, "reason": "x"}, headers=headers)
    assert first.status == 409
    await call(client, "POST", f"/payments/capture/{pid}", {"merchantId": m})
    again = await client.post(f"/payments/refund/{pid}", json={"merchantId": m, "reason": "x"}, headers=headers)
    assert again.status == 409 and again.headers["Idempotent-Replayed"] == "true"
    assert await first.read() == await again.read()
