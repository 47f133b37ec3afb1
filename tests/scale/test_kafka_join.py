"""``payctl.kafkajoin`` against real Apache Kafka (KRaft) on loopback, the way add-node finds the cluster: node 1 a
combined broker+controller formatted ``--standalone`` holding RF-1 topics (one with committed group offsets, so
``__consumer_offsets`` exists), node 2 a combined node formatted ``--no-initial-controllers`` (an observer). After
``add_controllers`` + ``raise_replication``: two voters, every partition (internal topics included) with 2 in-sync
replicas, the app topic's own min.insync.replicas 2, every record still there; a second run changes nothing."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payctl import kafkajoin
from tests.scale.conftest import LocalIO
from tests.support.kafka import _LOG4J2, KafkaNode, ensure_jars
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.slow

TOPIC = "payments.events"


def _write(node: KafkaNode, voters_bootstrap: str) -> None:
    node.base.mkdir(parents=True, exist_ok=True)
    props = {
        "process.roles": node.roles,
        "node.id": str(node.node_id),
        "controller.quorum.bootstrap.servers": voters_bootstrap,
        "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(node.base / "data"),
        "offsets.topic.replication.factor": "1",  # what a 1-node deployment ran with
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
        "unclean.leader.election.enable": "false",
    }
    node.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (node.base / "log4j2.properties").write_text(_LOG4J2.format(log=node.log))


def _format(lib: Path, node: KafkaNode, cluster: str, mode: str) -> None:
    out = subprocess.run(["java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", f"{lib}/*", "kafka.tools.StorageTool",
                          "format", f"--cluster-id={cluster}", mode, "-c", str(node.properties)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[KafkaNode, KafkaNode]]:
    lib = ensure_jars()
    cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    n1 = KafkaNode(1, "broker,controller", tmp_path / "n1", free_port(), free_port(), 256)
    n2 = KafkaNode(2, "broker,controller", tmp_path / "n2", free_port(), free_port(), 256)
    both = f"127.0.0.1:{n1.controller_port},127.0.0.1:{n2.controller_port}"
    try:
        _write(n1, f"127.0.0.1:{n1.controller_port}")
        _format(lib, n1, cluster, "--standalone")
        n1.launch(lib)
        wait_until(n1.started, 90, "kafka node 1", interval=0.2)
        _write(n2, both)  # the joining node knows every planned controller (the rendered phase-5 file)
        _format(lib, n2, cluster, "--no-initial-controllers")
        n2.launch(lib)
        wait_until(n2.started, 90, "kafka node 2 (observer)", interval=0.2)
        yield n1, n2
    finally:
        # Throwaway data: no graceful shutdown. With two voters neither can finish a controlled shutdown once the
        # other is gone, so SIGTERM alone used to cost the full 30 s wait (the slowest teardown of the suite).
        n2.stop(timeout=3)
        n1.stop(timeout=3)


async def _seed(bootstrap: str, count: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1,
                                            topic_configs={"min.insync.replicas": "1"})])  # fmt: skip
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(TOPIC, f"e{i}".encode(), key=str(i).encode())
    finally:
        await producer.stop()
    await _consume(bootstrap, count, commit=True)


async def _consume(bootstrap: str, count: int, commit: bool) -> list[str]:
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, group_id="g1" if commit else None,
                                auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    seen: list[str] = []
    try:
        while len(seen) < count:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                seen += [r.value.decode() for r in records if r.value is not None]
        if commit:
            await consumer.commit()
    finally:
        await consumer.stop()
    return seen


def test_parse_topics_and_reassignment() -> None:
    out = (
        "Topic: t\tTopicId: x\tPartitionCount: 2\tReplicationFactor: 1\tConfigs: min.insync.replicas=1,a=b\n"
        "\tTopic: t\tPartition: 0\tLeader: 1\tReplicas: 1\tIsr: 1\tElr: \tLastKnownElr: \n"
        "\tTopic: t\tPartition: 1\tLeader: 2\tReplicas: 2,1\tIsr: 2\tElr: \tLastKnownElr: \n"
    )
    [t] = kafkajoin.parse_topics(out)
    assert t.configs == {"min.insync.replicas": "1", "a": "b"}
    assert [(p.partition, p.leader, p.replicas, p.isr) for p in t.partitions] == [(0, 1, (1,), (1,)),
                                                                                  (1, 2, (2, 1), (2,))]  # fmt: skip
    # Only the partition lacking a replica moves; its leader stays first.
    moves = [{"topic": "t", "partition": 0, "replicas": [1, 2]}]
    assert kafkajoin.reassignment([t], [1, 2], 2) == {"version": 1, "partitions": moves}
    status = ('ClusterId: x\nCurrentVoters: [{"id": 1, "directoryId": "a", "endpoints": []}, '
              '{"id": 2, "directoryId": "b", "endpoints": []}]\nCurrentObservers: []')  # fmt: skip
    assert kafkajoin.parse_voters(status) == {1, 2}


def test_describe_waits_for_a_restarting_broker_then_gives_up() -> None:
    """The phase-5 apply before the Kafka step restarts brokers whose config changed: describe retries (our NodeIO
    seam answers "disconnected" twice), and fails with the tool's output once its wait is over."""
    header = "Topic: t\tTopicId: x\tPartitionCount: 1\tReplicationFactor: 1\tConfigs: \n"
    answers = [(False, "DisconnectException: node 1 being disconnected", "")] * 2 + [(True, header, "")]

    class Flaky:
        calls = 0

        def run(self, command: str) -> tuple[bool, str, str]:
            Flaky.calls += 1
            return answers.pop(0) if answers else (False, "still down", "")

        def put_private(self, path: str, text: str) -> None:
            raise AssertionError("not used")

    host = kafkajoin.KafkaHost("node1", Flaky(), "/lib", "/work")
    slept: list[float] = []
    [t] = kafkajoin.describe(host, "10.77.0.11:9092", wait_s=60, sleep=slept.append)
    assert t.name == "t" and Flaky.calls == 3 and slept == [2.0, 2.0]
    with pytest.raises(kafkajoin.KafkaJoinError, match="still down"):
        kafkajoin.describe(host, "10.77.0.11:9092", wait_s=0, sleep=slept.append)


def test_second_node_joins_quorum_and_every_topic_gets_rf2(nodes: tuple[KafkaNode, KafkaNode], tmp_path: Path) -> None:
    n1, n2 = nodes
    bootstrap = f"127.0.0.1:{n1.port}"
    asyncio.run(_seed(bootstrap, 30))
    lib = str(ensure_jars())
    work = tmp_path / "w"
    h1 = kafkajoin.KafkaHost("n1", LocalIO(), lib, str(work))
    h2 = kafkajoin.KafkaHost("n2", LocalIO(), lib, str(work))
    controllers = f"127.0.0.1:{n1.controller_port}"
    assert kafkajoin.voters(h1, controllers) == {1}
    steps: list[str] = []
    assert kafkajoin.add_controllers(h1, [(h2, 2, str(n2.properties))], controllers, step=steps.append) == {1, 2}
    both = f"{bootstrap},127.0.0.1:{n2.port}"
    topics = kafkajoin.raise_replication(h1, both, [1, 2], 2, 2, step=steps.append)
    names = {t.name for t in topics}
    assert {TOPIC, "__consumer_offsets"} <= names
    for t in topics:
        for p in t.partitions:
            assert sorted(p.replicas) == [1, 2] and sorted(p.isr) == [1, 2], (t.name, p)
    assert next(t for t in topics if t.name == TOPIC).configs["min.insync.replicas"] == "2"
    assert steps[0] == "n2: kafka-metadata-quorum add-controller (node 2)"
    assert steps[1].startswith("reassign 7 partition(s) of 2 topic(s) to RF 2")  # 3 + 4 offsets partitions
    # Nothing was lost, and the group's committed offsets survived the move of __consumer_offsets.
    assert sorted(asyncio.run(_consume(both, 30, commit=False))) == sorted(f"e{i}" for i in range(30))
    # Idempotent: nothing left to move or change.
    again: list[str] = []
    kafkajoin.add_controllers(h1, [(h2, 2, str(n2.properties))], controllers, step=again.append)
    kafkajoin.raise_replication(h1, both, [1, 2], 2, 2, step=again.append)
    assert again == ["n2 (node 2) is already a KRaft voter"]
