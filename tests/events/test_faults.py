"""Fault tests (short versions; the long ones are in bench/): two relays, kill -9 of relay and consumer during load,
a broker outage during load. After each, every committed payment's events are published at least once and applied
exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from payapp import eventcli
from tests.events.conftest import Api, Pipeline, eventually, mixed_load
from tests.events.test_pipeline import per_payment_mismatches, topic_event_ids
from tests.support.services import free_port


async def metrics_of(api: Api, port: int) -> dict[str, float]:
    try:
        resp = await api.client.session.get(f"http://127.0.0.1:{port}/metrics")
        text = await resp.text()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


async def assert_published_and_applied_once(p: Pipeline, timeout: float = 90) -> None:
    def drained() -> bool:
        unpublished = p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL")
        api_events = p.scalar("SELECT COUNT(*) FROM outbox_event WHERE topic <> 'payment.settled'")
        return unpublished == 0 and p.scalar("SELECT COUNT(*) FROM processed_event") == api_events

    await eventually(drained, timeout, "outbox published and every API event applied")
    seen = await topic_event_ids(p, ("payment.authorized", "payment.captured", "payment.refunded",
                                     "payment.cancelled", "payment.settled"))
    for topic, event_id in p.sql("SELECT topic, event_id FROM outbox_event"):
        assert event_id in seen[topic], f"{topic} {event_id} committed but never published"
    ops = p.scalar("SELECT COUNT(*) FROM payment_operation WHERE kind IN ('CAPTURE', 'REFUND')")
    assert p.scalar("SELECT COUNT(*) FROM settlement") == ops
    assert per_payment_mismatches(p) == []
    assert p.sql("SELECT SUM(IF(direction='DEBIT', amount, -amount)) FROM ledger_entry") == [["0"]]
    assert p.scalar("SELECT COUNT(*) FROM dlq_event") == 0
    done = p.payapp("reconcile")
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
async def test_two_relays_only_the_lease_holder_publishes_and_the_standby_takes_over(
    pipeline: Pipeline, api: Api
) -> None:
    p = pipeline
    ports = [free_port(), free_port()]
    relays = [p.start("relay", name=f"relay{i}", PAYAPP_RELAY_METRICS_PORT=str(port)) for i, port in enumerate(ports)]
    p.start("consume")
    await mixed_load(api, 8)
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0, 30,
                     "first batch published")

    async def leader_known() -> bool:
        ms = [await metrics_of(api, port) for port in ports]
        return all(ms) and sorted(m.get("payapp_relay_leader", -1) for m in ms) == [0, 1]

    await eventually(leader_known, 20, "one leader and one standby")
    ms = [await metrics_of(api, port) for port in ports]
    leader = 0 if ms[0]["payapp_relay_leader"] == 1 else 1
    standby = 1 - leader
    assert ms[standby]["payapp_relay_published_total"] == 0
    assert ms[leader]["payapp_relay_published_total"] > 0

    relays[leader].send_signal(signal.SIGKILL)
    relays[leader].wait(10)
    await mixed_load(api, 4, seed=1)
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") == 0, 30,
                     "the standby took over (lease TTL 2 s) and published")
    after = await metrics_of(api, ports[standby])
    assert after["payapp_relay_leader"] == 1 and after["payapp_relay_published_total"] > 0
    await assert_published_and_applied_once(p)


@pytest.mark.slow
async def test_kill_9_of_relay_and_consumer_during_load_loses_and_duplicates_nothing(
    pipeline: Pipeline, api: Api
) -> None:
    p = pipeline
    rng = random.Random(11)
    procs = {"relay": p.start("relay"), "consume": p.start("consume")}
    stop = asyncio.Event()

    async def load() -> None:
        for chunk in range(100):  # bounded: at most 1000 payments
            if stop.is_set():
                return
            await mixed_load(api, 10, seed=chunk)

    loader = asyncio.create_task(load())
    for kill in range(6):
        await asyncio.sleep(rng.uniform(0.2, 1.2))
        name = ("relay", "consume")[kill % 2]
        procs[name].send_signal(signal.SIGKILL)
        procs[name].wait(10)
        await asyncio.sleep(rng.uniform(0, 0.4))
        procs[name] = p.start(name)
    stop.set()
    await loader
    assert not loader.exception()
    await assert_published_and_applied_once(p)


@pytest.mark.slow
async def test_broker_outage_during_load_api_keeps_going_and_backlog_drains(pipeline: Pipeline, api: Api) -> None:
    p = pipeline
    p.start("relay")
    p.start("consume")
    await mixed_load(api, 4)
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM settlement") > 0, 30, "pipeline running")
    p.kafka.stop()  # Apache Kafka: a real stop, data on disk
    try:
        before = p.scalar("SELECT COUNT(*) FROM payment")
        await mixed_load(api, 24, seed=2)  # every request must still answer 200 (asserted in Api.post)
        assert p.scalar("SELECT COUNT(*) FROM payment") == before + 24
        await asyncio.sleep(2)
        assert p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") > 0  # the backlog
    finally:
        p.kafka.start_node()
    await assert_published_and_applied_once(p, timeout=120)


async def test_sigterm_with_the_broker_down_exits_in_seconds_and_loses_nothing(pipeline: Pipeline, api: Api) -> None:
    """The broker stops while the relay waits for acks (publish timeout 60 s, longer than supervisord's 30 s before it
    kills) and the consumer polls: SIGTERM ends both cleanly (exit 0, no traceback) within seconds. Session 5 saw a
    lab apply wait 60 s for them (relay and consumer each until their SIGKILL) and the consumer exit 1 with aiokafka's
    CancelledError. What they had not published or committed is delivered once by the next relay and consumer."""
    p = pipeline
    relay = p.start("relay", name="relay-slow", PAYAPP_RELAY_PUBLISH_TIMEOUT_S="60")
    cons = p.start("consume", name="consume-1")
    await mixed_load(api, 4)
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM settlement") > 0, 30, "pipeline running")
    p.kafka.stop()
    try:
        await mixed_load(api, 8, seed=3)
        await eventually(lambda: "acks" in p.log_of(relay) or "send failed" in p.log_of(relay) or
                         p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL") > 0, 20,
                         "a backlog the relay is trying to send")  # fmt: skip
        await asyncio.sleep(2)  # the relay is now in its 60 s wait for acks
        started = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        cons.send_signal(signal.SIGTERM)
        codes = {}
        while time.monotonic() - started < 40 and len(codes) < 2:
            for name, proc in (("relay", relay), ("consume", cons)):
                if name not in codes and proc.poll() is not None:
                    codes[name] = (proc.returncode, round(time.monotonic() - started, 1))
            await asyncio.sleep(0.1)
        print(f"SIGTERM with the broker down: (exit code, seconds to exit) {codes}")
        assert codes.get("relay", (None,))[0] == 0 and codes.get("consume", (None,))[0] == 0, (
            codes, p.log_of(relay)[-1500:], p.log_of(cons)[-1500:])
        # Exit 0 already says the watchdog (EXIT_STOP_OVERRAN at STOP_DEADLINE_S) did not have to end them.
        assert max(s for _, s in codes.values()) < eventcli.STOP_DEADLINE_S, codes
        assert "Traceback" not in p.log_of(cons) + p.log_of(relay)
    finally:
        p.kafka.start_node()
    p.start("relay", name="relay-2")
    p.start("consume", name="consume-2")
    await assert_published_and_applied_once(p, timeout=120)
