"""API keys (PAYAPP_AUTH=apikey and off), `payapp merchant create`, CORS, and the /metrics exposition."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from payapp.settings import Settings
from tests.app.conftest import app_client, merchant

Client = TestClient[Any, Any]
PAYAPP = str(Path(sys.executable).parent / "payapp")


def merchant_create(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PAYAPP, "merchant", "create", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
async def apikey_client(payapp_env: dict[str, str]) -> AsyncIterator[Client]:
    async with app_client(Settings.from_env({**payapp_env, "PAYAPP_AUTH": "apikey"})) as client:
        yield client


def test_merchant_create_prints_the_key_once_and_stores_its_hash(payapp_env: dict[str, str], app_db: Any) -> None:
    m = merchant()
    out = merchant_create(payapp_env, "--id", m, "--name", "Shop One")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert re.fullmatch(r"pk_[A-Za-z0-9_-]{43}", key)
    assert "shown once" in out.stderr
    stored = app_db.rows(f"SELECT name, api_key_hash FROM merchant WHERE merchant_id = '{m}'")
    assert stored[0][0] == "Shop One" and key not in stored[0][1] and len(stored[0][1]) == 64
    again = merchant_create(payapp_env, "--id", m)
    assert again.returncode == 1
    assert again.stderr == (f"payapp: error: merchant '{m}' already exists\n"
                            "payapp: hint: use --rotate-key to issue it a new API key\n")
    rotated = merchant_create(payapp_env, "--id", m, "--rotate-key")
    assert rotated.returncode == 0 and rotated.stdout.strip() != key
    bad = merchant_create(payapp_env, "--id", "has space")
    assert bad.returncode == 1 and "1-32 printable characters without spaces" in bad.stderr


async def test_api_keys_decide_the_merchant(apikey_client: Client, payapp_env: dict[str, str]) -> None:
    a, b = merchant(), merchant()
    key_a = merchant_create(payapp_env, "--id", a).stdout.strip()
    key_b = merchant_create(payapp_env, "--id", b).stdout.strip()
    body = {"amount": 5_000, "currency": "KRW", "idempotencyKey": "auth-1"}

    async def post(path: str, payload: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = await apikey_client.post(path, json=payload, headers=headers)
        return resp.status, await resp.json()

    for key, payload in [(None, body), ("pk_wrong", body), (key_a, {**body, "merchantId": b})]:
        status, answer = await post("/payments/authorize", payload, key)
        assert (status, answer["code"]) == (401, "UNAUTHORIZED"), answer
    status, answer = await post("/payments/authorize", body, key_a)
    assert (status, answer["merchantId"]) == (200, a)
    pid = answer["paymentId"]
    status, answer = await post("/payments/authorize", {**body, "merchantId": a, "idempotencyKey": "x"}, key_a)
    assert status == 200  # naming one's own merchant is fine

    # Merchant B cannot see or touch A's payment: 404, as if it did not exist.
    resp = await apikey_client.get(f"/payments/{pid}", headers={"Authorization": f"Bearer {key_b}"})
    assert resp.status == 404
    status, answer = await post(f"/payments/capture/{pid}", {}, key_b)
    assert (status, answer["code"]) == (404, "NOT_FOUND")
    status, answer = await post(f"/payments/capture/{pid}", {}, key_a)  # empty body: capture all
    assert (status, answer["capturedAmount"]) == (200, 5_000)
    resp = await apikey_client.get(f"/payments/{pid}", headers={"Authorization": f"Bearer {key_a}"})
    assert resp.status == 200


async def test_auth_off_trusts_merchant_id(client: Client) -> None:
    resp = await client.post("/payments/authorize", json={"merchantId": merchant(), "amount": 1, "currency": "KRW",
                                                          "idempotencyKey": "off"},
                             headers={"Authorization": "Bearer whatever"})
    assert resp.status == 200


async def test_cors_for_configured_origins(payapp_env: dict[str, str]) -> None:
    settings = Settings.from_env({**payapp_env, "PAYAPP_CORS_ORIGINS": "https://shop.example,https://admin.example"})
    async with app_client(settings) as client:
        pre = await client.options("/payments/authorize", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,idempotency-key"})
        assert pre.status == 204
        assert pre.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        assert "Idempotency-Key" in pre.headers["Access-Control-Allow-Headers"]
        resp = await client.post("/payments/authorize", json={"amount": 1}, headers={"Origin": "https://admin.example"})
        assert resp.status == 400  # errors carry CORS headers too, or the browser could not read them
        assert resp.headers["Access-Control-Allow-Origin"] == "https://admin.example"
        assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
        assert resp.headers["Vary"] == "Origin"
        evil = await client.options("/payments/authorize", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in evil.headers
        plain = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in plain.headers
    anyone = Settings.from_env({**payapp_env, "PAYAPP_CORS_ORIGINS": "*"})
    async with app_client(anyone) as client:
        resp = await client.get("/health", headers={"Origin": "https://anything.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_metrics_count_requests_by_route_and_status(payapp_env: dict[str, str]) -> None:
    async with app_client(Settings.from_env(payapp_env)) as client:
        m = merchant()
        for i in range(3):
            await client.post("/payments/authorize", json={"merchantId": m, "amount": 10, "currency": "KRW",
                                                           "idempotencyKey": f"met-{i}"})
        await client.post("/payments/authorize", json={"merchantId": m, "amount": 10, "currency": "KRW",
                                                       "idempotencyKey": "met-0"})
        await client.post("/payments/authorize", data=b"nope")
        await client.get("/payments/1/unknown")
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    assert 'payapp_http_requests_total{method="POST",route="/payments/authorize",status="200"} 4.0' in text
    assert 'payapp_http_requests_total{method="POST",route="/payments/authorize",status="400"} 1.0' in text
    assert 'payapp_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert ('payapp_http_request_duration_seconds_count{method="POST",route="/payments/authorize",status="200"} 4.0'
            in text)
    assert 'payapp_idempotent_replays_total{route="/payments/authorize"} 1.0' in text
