"""A worker's drain has a deadline: a cleanup that never returns (a pool waiting for a connection that is never
released, a blocked event loop) must not leave an orphaned worker that ignores SIGTERM forever."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from aiohttp import web

from payapp import worker


def test_drain_gives_up_on_a_cleanup_that_never_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "CLEANUP_GRACE_SECONDS", 0.3)
    reached = []

    async def go() -> tuple[int, float]:
        app = web.Application()

        async def hang(_: web.Application) -> None:
            reached.append(True)
            await asyncio.Event().wait()  # a pool that waits for a connection nobody releases

        app.on_cleanup.append(hang)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        start = time.monotonic()
        code = await worker.drain(runner, 0.1)
        return code, time.monotonic() - start

    code, took = asyncio.run(go())
    assert reached == [True]
    assert code == worker.EXIT_DRAIN_TIMEOUT
    assert took < 5


def test_drain_returns_0_when_cleanup_finishes() -> None:
    async def go() -> int:
        runner = web.AppRunner(web.Application(), shutdown_timeout=0.1)
        await runner.setup()
        return await worker.drain(runner, 0.1)

    assert asyncio.run(go()) == 0


def test_watchdog_ends_a_process_whose_loop_is_blocked() -> None:
    code = (
        "import time\n"
        "from payapp.worker import start_drain_watchdog\n"
        "start_drain_watchdog(0.5)\n"
        "time.sleep(60)  # a blocked loop: nothing else would ever end this process\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == worker.EXIT_DRAIN_TIMEOUT, proc.stderr
    assert time.monotonic() - start < 20
    assert "drain did not finish" in proc.stderr
