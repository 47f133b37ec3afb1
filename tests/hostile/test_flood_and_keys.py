"""Floods from one merchant (429 with Retry-After, other merchants unaffected) and, with PAYAPP_AUTH=apikey, merchants
trying each other's payments (always 404, never a replay of another merchant's stored response) and bad keys (401)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient

from payapp.auth import create_merchant
from payapp.settings import Settings
from tests.app.conftest import AppDatabase, ServeProcess, app_client, merchant
from tests.hostile.conftest import expect_error

Client = TestClient[Any, Any]
LIMIT = 20


def auth_body(m: str | None, **fields: Any) -> dict[str, Any]:
    body = {"amount": 1000, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex, **fields}
    if m is not None:
        body["merchantId"] = m
    return body


# --- floods --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def limited(settings: Settings) -> AsyncIterator[Client]:
    async with app_client(replace(settings, rate_limit_authorize=LIMIT, rate_limit_capture=LIMIT)) as c:
        yield c


async def test_a_flood_from_one_merchant_is_429_with_retry_after_and_others_are_unaffected(
        limited: Client, app_db: AppDatabase) -> None:
    flooder, others = merchant(), [merchant() for _ in range(5)]

    async def one(m: str) -> tuple[str, int, dict[str, Any], str | None]:
        resp = await limited.post("/payments/authorize", json=auth_body(m))
        return m, resp.status, await resp.json(), resp.headers.get("Retry-After")

    # 100 from the flooder interleaved with 10 from each of five others, all at once.
    calls = [one(flooder) for _ in range(100)] + [one(m) for m in others for _ in range(10)]
    results = await asyncio.gather(*calls)
    by = Counter((m == flooder, status) for m, status, _, _ in results)
    assert by[(True, 200)] == LIMIT and by[(True, 429)] == 100 - LIMIT, by
    assert by[(False, 200)] == 50, by  # every other merchant's request went through
    for m, status, body, retry_after in results:
        if status == 429:
            assert m == flooder
            assert body == {"code": "RATE_LIMIT_EXCEEDED", "message": body["message"]}
            assert retry_after is not None and 1 <= int(retry_after) <= 60
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{flooder}'") == LIMIT
    # The flooder's other actions have budgets of their own; its reads are not limited at all.
    pid = next(body["paymentId"] for m, status, body, _ in results if m == flooder and status == 200)
    assert (await limited.post(f"/payments/capture/{pid}", json={"merchantId": flooder})).status == 200
    assert (await limited.get(f"/payments/{pid}", params={"merchantId": flooder})).status == 200
    # A 429 is not stored: the same key is still free (and limited again while the window lasts).
    resp = await limited.post("/payments/authorize", json=auth_body(flooder, idempotencyKey="after-flood"))
    await expect_error(resp, 429, "RATE_LIMIT_EXCEEDED")
    assert app_db.scalar("SELECT COUNT(*) FROM idempotency_key WHERE idempotency_key = 'after-flood'") == 0


@pytest.mark.slow
def test_the_limit_holds_across_the_workers_of_a_real_server(serve: Any, payapp_env: dict[str, str],
                                                             app_db: AppDatabase) -> None:
    """Two worker processes share one Redis counter: a flood spread over both still gets exactly LIMIT."""
    from concurrent.futures import ThreadPoolExecutor

    server: ServeProcess = serve({**payapp_env, "PAYAPP_RATE_LIMIT_AUTHORIZE": str(LIMIT)}, workers=2)
    flooder, other = merchant(), merchant()

    def one(m: str) -> int:
        # A new connection per request, so SO_REUSEPORT spreads them over both workers.
        resp = requests.post(server.url + "/payments/authorize", json=auth_body(m), timeout=10,
                             headers={"Connection": "close"})
        if resp.status_code == 429:
            assert resp.json()["code"] == "RATE_LIMIT_EXCEEDED" and int(resp.headers["Retry-After"]) >= 1
        return resp.status_code

    with ThreadPoolExecutor(16) as pool:
        flood = list(pool.map(one, [flooder] * 80))
        calm = list(pool.map(one, [other] * 10))
    assert Counter(flood) == {200: LIMIT, 429: 80 - LIMIT}
    assert calm == [200] * 10
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{flooder}'") == LIMIT


# --- API keys ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def keyed(settings: Settings) -> AsyncIterator[Client]:
    async with app_client(replace(settings, auth="apikey")) as c:
        yield c


async def new_merchant(settings: Settings) -> tuple[str, dict[str, str]]:
    m = merchant()
    key = await create_merchant(settings.db_url, m, m)
    return m, {"Authorization": f"Bearer {key}"}


async def test_a_merchant_can_never_touch_another_merchants_payment(keyed: Client, settings: Settings,
                                                                    app_db: AppDatabase) -> None:
    a, key_a = await new_merchant(settings)
    b, key_b = await new_merchant(settings)
    resp = await keyed.post("/payments/authorize", json=auth_body(None, amount=9000), headers=key_a)
    assert resp.status == 200
    pid = (await resp.json())["paymentId"]
    uncaptured = (await (await keyed.post("/payments/authorize", json=auth_body(None), headers=key_a)).json())[
        "paymentId"]
    resp = await keyed.post(f"/payments/capture/{pid}", json={"amount": 5000}, headers={**key_a,
                                                                                       "Idempotency-Key": "shared"})
    assert resp.status == 200

    # B, with its own valid key, on A's payments: 404 for every operation, as if they did not exist.
    attempts = [
        ("GET", f"/payments/{pid}", None, {}),
        ("POST", f"/payments/capture/{pid}", {}, {}),
        ("POST", f"/payments/capture/{pid}", {"amount": 1}, {}),
        ("POST", f"/payments/refund/{pid}", {"reason": "mine now"}, {}),
        ("POST", f"/payments/refund/{pid}", {"amount": 1, "reason": "x"}, {"Idempotency-Key": "k-b"}),
        ("POST", f"/payments/void/{uncaptured}", {}, {}),
        ("POST", f"/payments/capture/{uncaptured}", {}, {}),
        ("GET", f"/payments/{uncaptured}", None, {}),
        # The same Idempotency-Key A used must not replay A's stored capture to B.
        ("POST", f"/payments/capture/{pid}", {"amount": 5000}, {"Idempotency-Key": "shared"}),
    ]
    for method, path, body, extra in attempts:
        resp = await keyed.request(method, path, json=body, headers={**key_b, **extra})
        data = await expect_error(resp, 404, "NOT_FOUND")
        assert resp.headers.get("Idempotent-Replayed") is None
        assert str(a) not in str(data)

    # Naming A in the request with B's key is refused outright (401), not served as A.
    for method, path, body in [
        ("GET", f"/payments/{pid}?merchantId={a}", None),
        ("POST", f"/payments/capture/{pid}", {"merchantId": a}),
        ("POST", f"/payments/refund/{pid}", {"merchantId": a, "reason": "x"}),
        ("POST", f"/payments/void/{uncaptured}", {"merchantId": a}),
        ("POST", "/payments/authorize", auth_body(a)),
    ]:
        resp = await keyed.request(method, path, json=body, headers=key_b)
        await expect_error(resp, 401, "UNAUTHORIZED")

    # An authorize idempotency key A used is B's own namespace: B gets a new payment, not A's.
    resp = await keyed.post("/payments/authorize", json=auth_body(None, amount=9000, idempotencyKey="same"),
                            headers=key_a)
    mine = (await resp.json())["paymentId"]
    resp = await keyed.post("/payments/authorize", json=auth_body(None, amount=9000, idempotencyKey="same"),
                            headers=key_b)
    theirs = await resp.json()
    assert resp.status == 200 and resp.headers.get("Idempotent-Replayed") is None
    assert theirs["paymentId"] != mine and theirs["merchantId"] == b

    # Nothing B did changed A's payments.
    rows = app_db.rows(f"SELECT payment_id, merchant_id, status, captured_amount, refunded_amount FROM payment"
                       f" WHERE payment_id IN ({pid}, {uncaptured}) ORDER BY payment_id")
    assert rows == [[str(pid), a, "COMPLETED", "5000", "0"], [str(uncaptured), a, "REQUESTED", "0", "0"]]
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{b}'") == 1


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer  ", "Basic dXNlcjpwYXNz", "Token pk_x", "pk_abc", "Bearer pk_wrong",
    "Bearer ' OR '1'='1", "Bearer pk_" + "A" * 7000, "Bearer *", "Bearer %", "Bearer null", "Bearer undefined",
])
async def test_missing_or_wrong_keys_are_401_in_the_error_shape(keyed: Client, settings: Settings,
                                                                authorization: str | None) -> None:
    owner, key = await new_merchant(settings)
    pid = (await (await keyed.post("/payments/authorize", json=auth_body(None), headers=key)).json())["paymentId"]
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path, body in [
        ("POST", "/payments/authorize", auth_body(None)),
        ("POST", "/payments/authorize", auth_body(owner)),  # naming the merchant is no substitute for its key
        ("POST", f"/payments/capture/{pid}", {}),
        ("POST", f"/payments/refund/{pid}", {"reason": "x"}),
        ("POST", f"/payments/void/{pid}", {}),
        ("GET", f"/payments/{pid}", None),
        ("GET", f"/payments/{pid}?merchantId={owner}", None),
    ]:
        resp = await keyed.request(method, path, json=body, headers=headers)
        await expect_error(resp, 401, "UNAUTHORIZED")
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
    resp = await keyed.get(f"/payments/{pid}", headers=key)
    assert (await resp.json())["status"] == "REQUESTED"


async def test_a_valid_key_with_extra_characters_is_not_valid(keyed: Client, settings: Settings) -> None:
    _, key = await new_merchant(settings)
    token = key["Authorization"].removeprefix("Bearer ")
    for variant in (token + "x", token[:-1], token.upper(), token + " extra", "x" + token):
        resp = await keyed.post("/payments/authorize", json=auth_body(None),
                                headers={"Authorization": f"Bearer {variant}"})
        await expect_error(resp, 401, "UNAUTHORIZED")
    resp = await keyed.post("/payments/authorize", json=auth_body(None), headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200  # the scheme is case-insensitive (RFC 9110), the key is not
