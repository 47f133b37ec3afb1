"""The real Apache Kafka broker the event pipeline is tested against: it accepts exactly the producer and consumer
settings payapp uses, keeps records and group offsets across a restart, and as a 2-broker cluster enforces
min.insync.replicas while a broker is down."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from tests.support.kafka import Kafka


async def _create(bootstrap: str, topic: str, partitions: int, rf: int, min_isr: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=rf,
                                            topic_configs={"min.insync.replicas": str(min_isr)})])
    finally:
        await admin.close()


def _producer(bootstrap: str, **extra: object) -> AIOKafkaProducer:
    settings: dict[str, object] = {"acks": "all", "compression_type": "lz4", "linger_ms": 10,
                                   "max_batch_size": 16384, "enable_idempotence": True}
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **{**settings, **extra})


async def _produce(bootstrap: str, topic: str, values: list[bytes], **extra: object) -> None:
    producer = _producer(bootstrap, **extra)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=v[-1:], value=v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, group: str, want: int, timeout: float = 30) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < want and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                got.extend(m.value for m in msgs if m.value is not None)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def test_single_broker_takes_payapp_producer_settings_and_group_commits(kafka: Kafka) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    await _create(kafka.bootstrap, topic, partitions=4, rf=1)
    values = [f"v{i}".encode() for i in range(500)]
    await _produce(kafka.bootstrap, topic, values)
    assert sorted(await _consume(kafka.bootstrap, topic, "g1", 500)) == sorted(values)
    # The group's manual commits are stored: a new member of the same group starts at the end.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, group_id="g1", enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        ends = await consumer.end_offsets(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        assert committed == ends
        assert sum(ends.values()) == 500
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_restart_keeps_records_and_offsets(tmp_path: Path) -> None:
    broker = Kafka(tmp_path / "k").start()
    try:
        await _create(broker.bootstrap, "r", partitions=2, rf=1)
        await _produce(broker.bootstrap, "r", [b"a1", b"b2", b"c3"])
        assert len(await _consume(broker.bootstrap, "r", "g", 3)) == 3
        pid = broker.pids()[0]
        broker.restart()
        assert broker.pids()[0] != pid
        await _produce(broker.bootstrap, "r", [b"d4"])
        # Only the record produced after the restart is new for the group: records and offsets survived.
        assert await _consume(broker.bootstrap, "r", "g", 1, timeout=15) == [b"d4"]
        assert sorted(await _consume(broker.bootstrap, "r", "fresh", 4)) == [b"a1", b"b2", b"c3", b"d4"]
    finally:
        broker.remove()


@pytest.mark.slow
async def test_two_brokers_enforce_min_insync_replicas_and_recover(tmp_path: Path) -> None:
    cluster = Kafka(tmp_path / "c", brokers=2).start()
    try:
        await _create(cluster.bootstrap, "strict", partitions=2, rf=2, min_isr=2)
        await _create(cluster.bootstrap, "lenient", partitions=2, rf=2, min_isr=1)
        await _produce(cluster.bootstrap, "strict", [b"s1", b"s2"])
        cluster.stop(broker=1)
        producer = _producer(cluster.bootstrap)
        await producer.start()
        try:
            # acks=all with one of two replicas gone: min.insync.replicas=2 refuses (NotEnoughReplicas, which the
            # idempotent producer retries without end), min.insync.replicas=1 accepts on the survivor.
            strict = await producer.send("strict", key=b"k", value=b"s3")
            done, _ = await asyncio.wait([strict], timeout=3)
            assert not done
            await asyncio.wait_for(await producer.send("lenient", key=b"k", value=b"l1"), 15)
            cluster.start_node(broker=1)
            await asyncio.wait_for(strict, 60)  # acknowledged once the replica is back in sync
        finally:
            await producer.stop()
        assert sorted(await _consume(cluster.bootstrap, "strict", "g", 3)) == [b"s1", b"s2", b"s3"]
        assert await _consume(cluster.bootstrap, "lenient", "g", 1) == [b"l1"]
    finally:
        cluster.remove()


@pytest.mark.slow
async def test_paused_broker_stalls_then_serves_again(tmp_path: Path) -> None:
    broker = Kafka(tmp_path / "p").start()
    try:
        await _create(broker.bootstrap, "p", partitions=1, rf=1)
        producer = _producer(broker.bootstrap, request_timeout_ms=1500)
        await producer.start()
        try:
            broker.pause()
            fut = await producer.send("p", value=b"while-paused")
            done, _ = await asyncio.wait([fut], timeout=2)
            assert not done  # a SIGSTOPped broker answers nothing
            broker.resume()
            await asyncio.wait_for(fut, 30)  # the producer retries and the record lands once
        finally:
            await producer.stop()
        assert await _consume(broker.bootstrap, "p", "g", 1) == [b"while-paused"]
    finally:
        broker.remove()
