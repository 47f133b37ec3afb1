"""A real payment service for the gate tests, from the app's own test helpers (tests/app/conftest.py): a freshly
migrated database on the session MariaDB, the session Redis, and `payapp serve` on a free loopback port, shared by
the module and stopped by its pid (workers included)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.app.conftest import make_env, new_database, start_serve
from tests.support.services import MariaDB, Redis


@dataclass(frozen=True)
class PayappServer:
    url: str
    env: dict[str, str]
    env_file: Path


@pytest.fixture(scope="module")
def payapp_server(
    mariadb: MariaDB, redis_server: Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PayappServer]:
    base = tmp_path_factory.mktemp("payapp-gate")
    db = new_database(mariadb, prefix="gate")
    env = make_env(db.url, redis_server.url(3), AUTH="off")
    env_file = base / "payapp.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    proc = start_serve(env, base / "serve.log", workers=1)
    try:
        proc.wait_ready()
        yield PayappServer(proc.url, {**env, "PAYAPP_PORT": str(proc.port)}, env_file)
    finally:
        pids = proc.worker_pids()
        proc.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mariadb.sql(f"DROP DATABASE IF EXISTS {db.name}")
