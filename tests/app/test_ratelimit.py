"""The per-merchant rate limit: shared in Redis, atomic with its expiry, Retry-After; and what happens when
Redis goes away (this module's own Redis: only it is stopped or paused)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from payapp.settings import Settings
from tests.app.conftest import AppDatabase, app_client, merchant
from tests.support.services import Redis

Client = TestClient[Any, Any]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis").start()
    yield server
    server.resume()
    server.stop()


def limited(env: dict[str, str], **overrides: str) -> Settings:
    return Settings.from_env({**env, **{f"PAYAPP_{k}": v for k, v in overrides.items()}})


async def authorize(client: Client, m: str, key: str) -> tuple[int, dict[str, Any], Any]:
    resp = await client.post("/payments/authorize", json={"merchantId": m, "amount": 100, "currency": "KRW",
                                                           "idempotencyKey": key})
    return resp.status, await resp.json(), resp.headers


async def test_over_the_limit_is_429_with_retry_after_and_not_stored(
    payapp_env: dict[str, str], redis_server: Redis, app_db: AppDatabase
) -> None:
    settings = limited(payapp_env, RATE_LIMIT_AUTHORIZE="3", RATE_LIMIT_CAPTURE="2")
    m, other = merchant(), merchant()
    async with app_client(settings) as client:
        statuses = [(await authorize(client, m, f"k{i}"))[0] for i in range(3)]
        assert statuses == [200, 200, 200]
        status, body, headers = await authorize(client, m, "k3")
        assert (status, body["code"]) == (429, "RATE_LIMIT_EXCEEDED")
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert (await authorize(client, other, "k0"))[0] == 200  # per merchant
        # Capture has its own budget.
        _, first, _ = await authorize(client, other, "for-capture")
        for expected in (200, 200, 429):
            resp = await client.post(f"/payments/capture/{first['paymentId']}", json={"merchantId": other,
                                                                                      "amount": 1})
            assert resp.status == expected
    assert app_db.scalar(f"SELECT COUNT(*) FROM idempotency_key WHERE merchant_id = '{m}' AND idempotency_key = 'k3'"
                         ) == 0
    r = redis.Redis.from_url(redis_server.url())
    ttl = r.pttl(f"payapp:rl:authorize:{m}")
    r.close()
    assert 0 < ttl <= 60_000  # the counter got its expiry in the same step as its first increment


async def test_redis_down_falls_back_to_the_local_share_and_payments_continue(
    payapp_env: dict[str, str], own_redis: Redis, app_db: AppDatabase
) -> None:
    # 2 workers share the budget: while Redis is down this worker allows 6 // 2 = 3 per minute and merchant.
    settings = limited(payapp_env, REDIS_URL=own_redis.url(), RATE_LIMIT_AUTHORIZE="6", WORKERS="2")
    m = merchant()
    async with app_client(settings) as client:
        assert (await authorize(client, m, "before"))[0] == 200
        own_redis.stop()
        results = [await authorize(client, m, f"down-{i}") for i in range(4)]
        assert [s for s, _, _ in results] == [200, 200, 200, 429]
        assert results[3][1]["code"] == "RATE_LIMIT_EXCEEDED" and int(results[3][2]["Retry-After"]) >= 1
        assert (await authorize(client, merchant(), "someone-else"))[0] == 200
        health = await client.get("/health")
        assert (health.status, await health.json()) == (200, {"status": "degraded", "db": "ok", "redis": "down"})
        metrics = await (await client.get("/metrics")).text()
        assert 'payapp_ratelimit_fallback_total{action="authorize"} 5.0' in metrics
        assert "payapp_ratelimit_redis_errors_total" in metrics

        # Redis comes back on the same port: decisions return to the shared counter.
        own_redis.start()
        await asyncio.sleep(1.2)  # the limiter retries Redis once a second
        assert (await authorize(client, merchant(), "after"))[0] == 200
        metrics = await (await client.get("/metrics")).text()
        assert 'payapp_ratelimit_fallback_total{action="authorize"} 5.0' in metrics
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 4


async def test_paused_redis_costs_one_timeout_then_falls_back(payapp_env: dict[str, str], own_redis: Redis) -> None:
    settings = limited(payapp_env, REDIS_URL=own_redis.url())
    async with app_client(settings) as client:
        assert (await authorize(client, merchant(), "warm"))[0] == 200
        own_redis.pause()  # SIGSTOP: connections hang instead of failing
        started = time.monotonic()
        statuses = [(await authorize(client, merchant(), f"p{i}"))[0] for i in range(20)]
        elapsed = time.monotonic() - started
        metrics = await (await client.get("/metrics")).text()
        own_redis.resume()
    assert statuses == [200] * 20
    # Not one timeout per request: one per retry interval (1 s) at most, the rest decided locally at once.
    errors = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("payapp_ratelimit_redis_errors_total "))
    assert 1 <= errors <= 2 + elapsed


async def test_fail_closed_rejects_with_503_when_redis_is_down(payapp_env: dict[str, str], own_redis: Redis) -> None:
    settings = limited(payapp_env, REDIS_URL=own_redis.url(), RATE_LIMIT_FAIL="closed")
    async with app_client(settings) as client:
        own_redis.stop()
        status, body, headers = await authorize(client, merchant(), "closed")
        assert (status, body["code"], headers["Retry-After"]) == (503, "SERVICE_UNAVAILABLE", "1")
        health = await client.get("/health")
        assert health.status == 503
