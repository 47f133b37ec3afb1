"""Stopping the event processes must not wait for a broker that is gone: ``wait_or_stop`` (the relay's ack wait and
the consumer's offset commit), and the watchdog every event command arms on SIGTERM. The real-broker case is
tests/events/test_faults.py::test_sigterm_with_the_broker_down_exits_in_seconds_and_loses_nothing; here the cases
that one cannot pin down (the consumer caught mid-commit when the broker went away, a client that swallows its
cancellation), with a stand-in at our own seam: the object whose ``commit`` the consumer awaits."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from payapp import eventcli
from payapp.consumer import Worker
from payapp.events import Stopped, wait_or_stop

_RELEASED: list[bool] = []


async def _stubborn() -> str:
    """Never finishes and swallows every cancellation (as a client retrying a commit until the broker is back)
    until the test releases it (the session's event loop must be able to close)."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if _RELEASED:
                raise


async def _release_stubborn() -> None:
    _RELEASED.append(True)
    for task in asyncio.all_tasks():
        if task.get_coro().__name__ == "_stubborn":  # type: ignore[union-attr]
            task.cancel()
    await asyncio.sleep(0)
    _RELEASED.clear()


async def test_wait_or_stop_result_timeout_and_stop() -> None:
    stop = asyncio.Event()

    async def value() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await wait_or_stop(value(), stop, 5) == 7
    with pytest.raises(TimeoutError):
        await wait_or_stop(asyncio.sleep(10), stop, 0.1)
    asyncio.get_running_loop().call_later(0.1, stop.set)
    started = time.monotonic()
    try:
        with pytest.raises(Stopped):
            await wait_or_stop(_stubborn(), stop, 30)  # a task that ignores cancel() does not hold us
        assert time.monotonic() - started < 2
    finally:
        await _release_stubborn()


class _GoneCoordinator:
    """The consumer's Kafka client with the group coordinator gone: ``commit`` waits for it forever."""

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        await _stubborn()


async def test_an_offset_commit_waiting_for_a_gone_broker_ends_on_stop(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    pending = {TopicPartition("payment.captured", 0): OffsetAndMetadata(42, "")}
    asyncio.get_running_loop().call_later(0.2, stop.set)
    started = time.monotonic()
    try:
        await Worker._commit(_GoneCoordinator(), pending, stop)  # type: ignore[arg-type]
        assert time.monotonic() - started < 2
    finally:
        await _release_stubborn()
    assert pending == {}
    assert "records will be redelivered" in caplog.text


def test_an_event_command_still_running_after_sigterm_is_ended_by_its_watchdog() -> None:
    """`_until_signal` (relay, consume, reconcile --schedule): work that never returns after SIGTERM is ended
    STOP_DEADLINE_S later with EXIT_STOP_OVERRAN and a log line, never left to supervisord's SIGKILL."""
    code = textwrap.dedent(
        """
        import asyncio, logging, sys
        from payapp import eventcli
        logging.basicConfig(level="INFO", stream=sys.stderr)
        eventcli.STOP_DEADLINE_S = 0.5

        async def work(stop):
            await stop.wait()
            while True:  # a stop that never completes
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue

        print("ready", flush=True)
        eventcli._until_signal(work)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(15)
    finally:
        proc.kill()
    assert rc == eventcli.EXIT_STOP_OVERRAN != eventcli.EXIT_UNBALANCED
    assert "did not finish within" in proc.stderr.read()  # type: ignore[union-attr]
