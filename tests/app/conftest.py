"""Fixtures for the payment service, reusable by any test that needs payapp (import them from here).

- ``app_db``: a fresh, migrated database per test module on the session MariaDB (``AppDatabase``: url, queries).
- ``payapp_env``: the PAYAPP_* variables for it and the session Redis; ``make_env(...)`` builds variants.
- ``settings``: ``Settings`` from that environment.
- ``client``: an aiohttp test client on ``create_app(settings)`` in this process (module scope);
  ``app_client(settings)`` opens one with other settings.
- ``serve``: starts ``payapp serve`` as a real subprocess on a free port (``ServeProcess``), stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from payapp.app import create_app
from payapp.migrate import migrate
from payapp.settings import Settings
from tests.support.services import MariaDB, Redis, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass
class AppDatabase:
    """One migrated database on the session MariaDB, with helpers to look inside it."""

    server: MariaDB
    name: str

    @property
    def url(self) -> str:
        return self.server.url(db=self.name)

    def rows(self, query: str) -> list[list[str]]:
        out = self.server.sql(query, db=self.name)
        return [line.split("\t") for line in out.splitlines() if line]

    def scalar(self, query: str) -> int:
        rows = self.rows(query)
        return int(rows[0][0]) if rows and rows[0][0] != "NULL" else 0


def new_database(server: MariaDB, prefix: str = "payapp") -> AppDatabase:
    database = AppDatabase(server, f"{prefix}_{uuid.uuid4().hex[:10]}")
    migrate(database.url)
    return database


def make_env(db_url: str, redis_url: str, **overrides: str | int) -> dict[str, str]:
    """PAYAPP_* variables for a test instance; ``overrides`` use setting names without the prefix (PORT=...)."""
    env = {
        "PAYAPP_DB_URL": db_url,
        "PAYAPP_REDIS_URL": redis_url,
        "PAYAPP_HOST": "127.0.0.1",
        "PAYAPP_PORT": "8080",  # only `payapp serve` listens; start_serve picks a free port
        "PAYAPP_WORKERS": "1",
        "PAYAPP_DB_POOL_SIZE": "8",
        "PAYAPP_LOG_LEVEL": "warning",
        "PAYAPP_SHUTDOWN_TIMEOUT": "15",
    }
    env.update({f"PAYAPP_{k}": str(v) for k, v in overrides.items()})
    return env


def merchant() -> str:
    """A merchant id of its own, so per-merchant rate-limit counters never collide between tests."""
    return "m-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def app_db(mariadb: MariaDB) -> Iterator[AppDatabase]:
    database = new_database(mariadb)
    yield database
    mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")


@pytest.fixture(scope="module")
def payapp_env(app_db: AppDatabase, redis_server: Redis) -> dict[str, str]:
    return make_env(app_db.url, redis_server.url())


@pytest.fixture(scope="module")
def settings(payapp_env: dict[str, str]) -> Settings:
    return Settings.from_env(payapp_env)


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """A test client on create_app(settings), served in this process."""
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with app_client(settings) as c:
        yield c


@dataclass
class ServeProcess:
    """A running ``payapp serve`` (the master process); its output goes to ``log``."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    workers: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def listeners(self) -> int:
        """Sockets listening on the port (each worker has its own, SO_REUSEPORT)."""
        suffix = f":{self.port:04X}"
        with open("/proc/net/tcp") as fh:
            rows = [line.split() for line in fh.readlines()[1:]]
        return sum(1 for row in rows if row[1].endswith(suffix) and row[3] == "0A")

    def wait_ready(self, timeout: float = 60) -> ServeProcess:
        """Until every worker listens and /health answers 200."""
        import requests

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"payapp serve exited with {self.proc.returncode}: {self.output()}")
            if self.listeners() < self.workers:
                return False
            try:
                return requests.get(self.url + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout, f"payapp serve on port {self.port}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_serve(env: dict[str, str], log: Path, workers: int = 2, port: int | None = None) -> ServeProcess:
    """Start ``payapp serve`` with ``env`` (PAYAPP_* only is enough) on a free port; not yet waited for."""
    port = port or free_port()
    full = {**os.environ, **env, "PAYAPP_PORT": str(port), "PAYAPP_WORKERS": str(workers)}
    with log.open("ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "payapp"), "serve"], env=full, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
    return ServeProcess(proc, port, log, workers)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve(env, workers=2)`` starts ``payapp serve`` and waits until it answers; stopped after the test."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], workers: int = 2, wait: bool = True) -> ServeProcess:
        proc = start_serve(env, tmp_path / f"serve-{len(started)}.log", workers)
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for proc in started:
        proc.stop()  # the master exits only after its workers did

