"""PAYAPP_DB_POOL_TIMEOUT_MS (phase 3's pool timeouts): with every pooled connection busy, a request fails fast with
503 + Retry-After instead of queueing behind them, and the pool serves again once a connection is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from payapp.keys import DB_POOL, PAYMENTS
from payapp.settings import Settings
from tests.app.conftest import AppDatabase, app_client, make_env, merchant
from tests.app.test_api import assert_error, authorize, call
from tests.support.services import Redis


async def test_a_request_waiting_longer_than_the_pool_timeout_gets_503(
    app_db: AppDatabase, redis_server: Redis
) -> None:
    env = make_env(app_db.url, redis_server.url(), DB_POOL_SIZE=1, DB_POOL_TIMEOUT_MS=200)
    async with app_client(Settings.from_env(env)) as client:
        m = merchant()
        await authorize(client, m, 1_000, key="warm")  # the pool's one connection exists now
        pool = client.app[DB_POOL]
        async with pool.acquire():  # a slow request holds the only connection
            start = time.monotonic()
            status, body, headers = await call(client, "POST", "/payments/authorize", {
                "merchantId": m, "amount": 2_000, "currency": "KRW", "idempotencyKey": "waits"})  # fmt: skip
            waited = time.monotonic() - start
        assert_error(status, body, 503, "SERVICE_UNAVAILABLE")
        assert headers["Retry-After"] == "1"
        assert 0.15 < waited < 5
        # The connection is back: the retry with the same idempotency key succeeds, and nothing was half-written.
        again = await authorize(client, m, 2_000, key="waits")
        assert again["status"] == "REQUESTED"  # the API's state after authorize
        assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 2


async def test_no_timeout_by_default(app_db: AppDatabase, redis_server: Redis) -> None:
    async with app_client(Settings.from_env(make_env(app_db.url, redis_server.url()))) as client:
        assert client.app[DB_POOL].timeout is None


async def test_a_database_connection_cut_mid_reply_is_503_not_500(
    app_db: AppDatabase, redis_server: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the server (or the query timeout) cuts while a reply is read surfaces from the driver as
    asyncio.IncompleteReadError (an EOFError, not a ConnectionError): the database is unavailable, so 503 + Retry-After
    in the error shape, never 500. The seam: the app's payments service (ours) raising what the driver raised."""
    async with app_client(Settings.from_env(make_env(app_db.url, redis_server.url()))) as client:
        service = client.app[PAYMENTS]

        async def cut(req: object) -> None:
            raise asyncio.IncompleteReadError(b"\x07\x00", 11)

        monkeypatch.setattr(service, "authorize", cut)
        status, body, headers = await call(client, "POST", "/payments/authorize", {
            "merchantId": merchant(), "amount": 1_000, "currency": "KRW", "idempotencyKey": "cut"})  # fmt: skip
        assert_error(status, body, 503, "SERVICE_UNAVAILABLE")
        assert headers["Retry-After"] == "1"


async def test_a_connection_the_server_closed_while_opening_is_503_not_500(
    app_db: AppDatabase, redis_server: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncmy raises RuntimeError("Transport does not expose socket instance") when the server hangs up while a
    pooled connection is being opened (MariaDB at max_connections): 503 + Retry-After, never 500. Seam: the pool
    wrapper's driver pool (what asyncmy raised, raised)."""
    async with app_client(Settings.from_env(make_env(app_db.url, redis_server.url()))) as client:
        pool = client.app[DB_POOL]

        async def hung_up() -> None:
            raise RuntimeError("Transport does not expose socket instance")

        monkeypatch.setattr(pool.raw, "acquire", hung_up)
        status, body, headers = await call(client, "POST", "/payments/authorize", {
            "merchantId": merchant(), "amount": 1_000, "currency": "KRW", "idempotencyKey": "hung-up"})  # fmt: skip
        assert_error(status, body, 503, "SERVICE_UNAVAILABLE")
        assert headers["Retry-After"] == "1"
