from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.support.kafka import Kafka
from tests.support.services import MariaDB, Redis

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """One real Apache Kafka (KRaft, combined broker+controller) for the session; tests use their own topics."""
    broker = Kafka(tmp_path_factory.mktemp("kafka")).start()
    yield broker
    broker.remove()


def noon_tz() -> str:
    """A fixed-offset zone where it is about noon now: a test's payments and its `payapp reconcile` (which judges the
    business day of that zone) never straddle a midnight, whatever the hour CI runs (Asia/Seoul's midnight is 15:00
    UTC). Etc/GMT signs are inverted (Etc/GMT-9 is UTC+9)."""
    offset = 12 - time.gmtime().tm_hour  # -11 .. +12
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


@dataclass
class Pipeline:
    """One test's private world: a fresh migrated database, a topic prefix and a consumer group on the shared
    broker, and the payapp processes it started (stopped by pid at the end)."""

    mariadb: MariaDB
    kafka: Kafka
    redis: Redis
    base: Path
    database: str
    prefix: str
    extra: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return self.mariadb.url(db=self.database)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYAPP_")}
        env.update({
            "PAYAPP_DB_URL": self.db_url,
            "PAYAPP_REDIS_URL": self.redis.url(),
            "PAYAPP_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "PAYAPP_KAFKA_TOPIC_PREFIX": self.prefix,
            "PAYAPP_KAFKA_GROUP": f"{self.prefix}settlement",
            "PAYAPP_LEASE_TTL_S": "2",
            "PAYAPP_RELAY_PUBLISH_TIMEOUT_S": "5",
            "PAYAPP_RECONCILE_SETTLE_LAG_S": "0",
            "PAYAPP_RECONCILE_TZ": noon_tz(),
            "PAYAPP_WORKERS": "1",
            "PAYAPP_LOG_LEVEL": "info",
        })
        env.update(self.extra)
        env.update(overrides)
        return env

    def settings_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env().items() if k.startswith("PAYAPP_")}

    def payapp(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "payapp"), *args], env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args: str, name: str = "", **env: str) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name or args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115 - child owns it
        proc = subprocess.Popen([str(VENV_BIN / "payapp"), *args], env=self.env(**env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        i = self.procs.index(proc)
        return next(self.base.glob(f"*-{i}.log")).read_text(errors="replace")

    def sql(self, statements: str) -> list[list[str]]:
        out = self.mariadb.sql(statements, db=self.database)
        return [line.split("\t") for line in out.splitlines() if line]

    def scalar(self, query: str) -> int:
        return int(self.sql(query)[0][0])

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def pipeline(mariadb: MariaDB, kafka: Kafka, redis_server: Redis, tmp_path: Path) -> Iterator[Pipeline]:
    from payapp.migrate import migrate

    tag = uuid.uuid4().hex[:8]
    p = Pipeline(mariadb, kafka, redis_server, tmp_path, f"ev_{tag}", f"t{tag}.")
    migrate(p.db_url)
    yield p
    p.stop_all()
    mariadb.sql(f"DROP DATABASE IF EXISTS {p.database}")


@dataclass
class Api:
    client: TestClient[Any, Any]
    merchant: str = "m-events"

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.post(path, json=body)
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, (path, body, resp.status, data)
        return data

    async def authorize(self, amount: int, key: str | None = None) -> int:
        data = await self.post("/payments/authorize", {"merchantId": self.merchant, "amount": amount,
                                                       "currency": "KRW", "idempotencyKey": key or uuid.uuid4().hex})
        return int(data["paymentId"])

    async def capture(self, pid: int, amount: int | None = None) -> None:
        body: dict[str, Any] = {"merchantId": self.merchant}
        if amount is not None:
            body["amount"] = amount
        await self.post(f"/payments/capture/{pid}", body)

    async def refund(self, pid: int, amount: int) -> None:
        await self.post(f"/payments/refund/{pid}", {"merchantId": self.merchant, "amount": amount, "reason": "test"})

    async def void(self, pid: int) -> None:
        await self.post(f"/payments/void/{pid}", {"merchantId": self.merchant})


@pytest.fixture
async def api(pipeline: Pipeline) -> AsyncIterator[Api]:
    """The real payment app (create_app) in this process, on the test's database."""
    from payapp.app import create_app
    from payapp.settings import Settings

    app = create_app(Settings.from_env(pipeline.settings_env()))
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Api(client)
    finally:
        await client.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                     interval: float = 0.2) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        ok = await result if asyncio.iscoroutine(result) else result
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def mixed_load(api: Api, n: int, seed: int = 0) -> dict[str, int]:
    """n payments: all authorized; by index: voided, captured in full, captured in two parts (+ a refund),
    captured and refunded in two parts. Returns counts of what was done."""
    counts = {"authorize": 0, "capture": 0, "refund": 0, "void": 0}
    for i in range(n):
        amount = 1000 + 10 * ((i * 7 + seed) % 50)
        pid = await api.authorize(amount)
        counts["authorize"] += 1
        kind = i % 4
        if kind == 0:
            await api.void(pid)
            counts["void"] += 1
        elif kind == 1:
            await api.capture(pid)
            counts["capture"] += 1
        elif kind == 2:
            await api.capture(pid, amount // 2)
            await api.capture(pid, amount // 4)
            await api.refund(pid, amount // 8)
            counts["capture"] += 2
            counts["refund"] += 1
        else:
            await api.capture(pid)
            await api.refund(pid, 100)
            await api.refund(pid, 200)
            counts["capture"] += 1
            counts["refund"] += 2
    return counts
