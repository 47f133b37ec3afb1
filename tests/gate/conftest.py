"""A real payment service for the gate tests: `payapp migrate` + `payapp serve` on a free loopback port, over the
session's private MariaDB and Redis (tests/support/services). Stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.services import MariaDB, Redis, free_port, wait_until

PAYAPP = str(Path(sys.executable).parent / "payapp")


@dataclass(frozen=True)
class PayappServer:
    url: str
    env: dict[str, str]
    env_file: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def payapp_server(
    mariadb: MariaDB, redis_server: Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PayappServer]:
    base = tmp_path_factory.mktemp("payapp-gate")
    mariadb.sql("CREATE DATABASE IF NOT EXISTS gate_pay")
    port = free_port()
    settings = {
        "PAYAPP_DB_URL": mariadb.url(db="gate_pay"),
        "PAYAPP_REDIS_URL": redis_server.url(3),
        "PAYAPP_HOST": "127.0.0.1",
        "PAYAPP_PORT": str(port),
        "PAYAPP_WORKERS": "1",
        "PAYAPP_AUTH": "off",
    }
    env_file = base / "payapp.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {**os.environ, **settings}
    mig = subprocess.run([PAYAPP, "migrate"], env=env, capture_output=True, text=True, timeout=120, check=False)
    if mig.returncode != 0:
        pytest.fail(f"payapp migrate failed ({mig.returncode}): {mig.stderr[-2000:]}")
    log = (base / "serve.log").open("wb")
    proc = subprocess.Popen([PAYAPP, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url) or proc.poll() is not None, 60, "payapp serve to answer /health")
        if proc.poll() is not None:
            pytest.fail(f"payapp serve exited {proc.returncode}: {(base / 'serve.log').read_text()[-2000:]}")
        yield PayappServer(url, env, env_file)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
