"""`payapp serve` as a real process tree: workers sharing the port, /metrics summed across them, graceful SIGTERM
under load losing no committed payment, workers dying with their master, restarts, and a busy port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from tests.app.conftest import AppDatabase, ServeProcess, merchant, start_serve
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.slow

Serve = Callable[..., ServeProcess]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_share_the_port_and_metrics_are_summed(serve: Serve, payapp_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    server = serve({**payapp_env, "PAYAPP_METRICS_DIR": str(metrics_dir)}, workers=2)
    assert server.listeners() == 2 and len(server.worker_pids()) == 2
    m = merchant()
    for i in range(40):  # a new connection each time: SO_REUSEPORT spreads them over the workers
        r = requests.post(server.url + "/payments/authorize", headers={"Connection": "close"},
                          json={"merchantId": m, "amount": 100, "currency": "KRW", "idempotencyKey": f"k{i}"})
        assert r.status_code == 200, r.text
    writers = {p.name for p in metrics_dir.glob("counter_*.db")}
    assert writers == {f"counter_{pid}.db" for pid in server.worker_pids()}  # both workers served some
    text = requests.get(server.url + "/metrics").text
    assert 'payapp_http_requests_total{method="POST",route="/payments/authorize",status="200"} 40.0' in text


async def _load(url: str, m: str, until: asyncio.Event, results: list[tuple[str, Any, str]]) -> None:
    """Authorize as fast as 32 connections allow until ``until`` is set; record every outcome."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one() -> None:
            key = uuid.uuid4().hex
            try:
                async with session.post(url + "/payments/authorize", json={
                        "merchantId": m, "amount": 1_000, "currency": "KRW", "idempotencyKey": key}) as resp:
                    body = await resp.json(content_type=None)
                    results.append(("ok", body["paymentId"], key) if resp.status == 200 else ("http", resp.status,
                                                                                              key))
            except (TimeoutError, aiohttp.ClientError) as exc:
                results.append(("error", type(exc).__name__, key))

        tasks: set[asyncio.Task[None]] = set()
        while not until.is_set():
            if len(tasks) < 64:
                task = asyncio.ensure_future(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)


async def test_sigterm_under_load_loses_no_committed_payment(serve: Serve, payapp_env: dict[str, str],
                                                              app_db: AppDatabase) -> None:
    server = serve({**payapp_env, "PAYAPP_LOG_LEVEL": "info"}, workers=2)
    workers = server.worker_pids()
    m = merchant()
    stop_load = asyncio.Event()
    results: list[tuple[str, Any, str]] = []
    load = asyncio.ensure_future(_load(server.url, m, stop_load, results))
    await asyncio.sleep(2.0)
    in_flight_at_signal = len(results)
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.5)  # keep knocking while it drains and after it stopped listening
    stop_load.set()
    await load
    assert await asyncio.to_thread(server.proc.wait, 60) == 0
    assert not any(_alive(pid) for pid in workers)

    answered = {pid for kind, pid, _ in results if kind == "ok"}
    assert in_flight_at_signal > 10 and len(answered) > 10
    assert {kind for kind, _, _ in results} <= {"ok", "error"}, [r for r in results if r[0] == "http"][:5]
    stored = {int(r[0]) for r in app_db.rows(f"SELECT payment_id FROM payment WHERE merchant_id = '{m}'")}
    # Every payment the client was told about is committed, and nothing was committed without its answer.
    assert stored == answered
    assert app_db.scalar(f"SELECT COUNT(*) FROM ledger_entry l JOIN payment p USING (payment_id)"
                         f" WHERE p.merchant_id = '{m}'") == 2 * len(stored)
    assert app_db.scalar(f"SELECT COUNT(*) FROM outbox_event WHERE merchant_id = '{m}'") == len(stored)
    assert "draining" in server.output()


def test_workers_die_with_a_killed_master(serve: Serve, payapp_env: dict[str, str]) -> None:
    server = serve(payapp_env, workers=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: not any(_alive(pid) for pid in workers), 30, "workers to exit after their master died")
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=2)


def test_a_crashed_worker_is_restarted(serve: Serve, payapp_env: dict[str, str]) -> None:
    server = serve(payapp_env, workers=2)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids()
               and server.listeners() == 2, 30, "the master to restart the worker")
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert "restarting" in server.output()


def test_a_busy_port_is_one_clear_failure(payapp_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as squatter:  # a plain listener without SO_REUSEPORT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        server = start_serve(payapp_env, tmp_path / "busy.log", workers=2, port=port)
        started = time.monotonic()
        code = server.proc.wait(60)
    assert code == 1 and time.monotonic() - started < 30
    assert "cannot listen on 127.0.0.1" in server.output()
