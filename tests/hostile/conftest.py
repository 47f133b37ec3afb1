"""Fixtures for the hostile-input tests: the payment service's own fixtures (tests/app/conftest.py), reused.

Added here: ``check_error`` (the one error shape, the right code, no traceback), ``authorized`` (a fresh payment
for a new merchant) and ``fuzz_server`` (one real ``payapp serve`` per module, for schemathesis and slow clients).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.app.conftest import (  # noqa: F401 - fixtures are used by name
    AppDatabase,
    ServeProcess,
    app_db,
    client,
    make_env,
    merchant,
    new_database,
    payapp_env,
    serve,
    settings,
    start_serve,
)
from tests.support.services import MariaDB, Redis

ERROR_KEYS = {"code", "message", "paymentId"}


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An in-process app that hit an unexpected exception logs it (with its traceback) even when the client got a
    tidy answer: no hostile test may leave such a record."""
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR
           and r.name.startswith(("payapp", "aiohttp"))]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def check_error(status: int, body: bytes, content_type: str, want_status: int, want_code: str) -> dict[str, Any]:
    """Assert a response is the documented error: status, JSON ``{code, message, paymentId?}``, no traceback."""
    text = body.decode("utf-8", errors="replace")
    assert status == want_status, (status, text[:500])
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert content_type.startswith("application/json"), (content_type, text[:200])
    data = json.loads(body)
    assert isinstance(data, dict) and set(data) <= ERROR_KEYS and {"code", "message"} <= set(data), data
    assert isinstance(data["message"], str) and data["message"], data
    assert data["code"] == want_code, data
    if "paymentId" in data:
        assert isinstance(data["paymentId"], int) and data["paymentId"] > 0, data
    return data


async def expect_error(resp: Any, want_status: int, want_code: str) -> dict[str, Any]:
    """``check_error`` on an aiohttp client response."""
    return check_error(resp.status, await resp.read(), resp.headers.get("Content-Type", ""), want_status, want_code)


async def authorize(http: TestClient[Any, Any], merchant_id: str, amount: int = 1000,
                    headers: dict[str, str] | None = None) -> int:
    body = {"merchantId": merchant_id, "amount": amount, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex}
    resp = await http.post("/payments/authorize", json=body, headers=headers)
    data = await resp.json()
    assert resp.status == 200, data
    return int(data["paymentId"])


@contextlib.contextmanager
def running_server(mariadb: MariaDB, redis_server: Redis, log_dir: Path,
                   **overrides: str) -> Iterator[tuple[ServeProcess, AppDatabase]]:
    """A real ``payapp serve`` (1 worker) on a database of its own, with PAYAPP_* ``overrides``; stopped by pid."""
    database = new_database(mariadb, "hostile")
    env = make_env(database.url, redis_server.url(), KEEPALIVE_TIMEOUT="5", **overrides)
    proc = start_serve(env, log_dir / "serve.log", workers=1)
    try:
        proc.wait_ready()
        yield proc, database
    finally:
        proc.stop()
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")
    assert "Traceback" not in proc.output(), proc.output()[-3000:]  # whatever the clients saw


@pytest.fixture(scope="module")
def fuzz_server(mariadb: MariaDB, redis_server: Redis,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A real ``payapp serve`` (1 worker, auth off) on its own database, for the whole module."""
    with running_server(mariadb, redis_server, tmp_path_factory.mktemp("serve")) as (proc, _):
        yield proc
