"""Kafka when a node joins: the new controllers enter the KRaft quorum, every topic gets the planned replication
factor by partition reassignment, and the topics' ``min.insync.replicas`` follows the plan.

The first node formatted its storage with ``--standalone`` (a one-voter dynamic quorum, KIP-853); the new node and
the witness were formatted with ``--no-initial-controllers`` and run as observers until they are added as voters:

    voters      ``kafka-metadata-quorum add-controller`` run on each new controller (it reads that node's own
                properties and storage directory id), one at a time, retried until it has caught up as an observer
    replicas    ``kafka-topics --describe`` (internal topics included: ``__consumer_offsets``, the transaction log);
                every partition with fewer replicas than planned gets the other brokers appended (the leader stays
                first, so leadership does not move) by ``kafka-reassign-partitions --execute``; done when every
                partition's ISR holds the planned count
    min ISR     topics carry their own ``min.insync.replicas`` (payapp creates them with it): set to the plan's value
                with ``kafka-configs --alter`` once the ISR is complete (earlier, producers with acks=all would stop)

Partition counts never change, so keys keep their partition. Every tool runs on a node through ``NodeIO`` (SSH in a
deployment, a local shell in the tests, which run this against real brokers).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from payctl.errors import PayctlError
from payctl.replication import NodeIO

T = TypeVar("T")

JVM = "java -Xmx160m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
TOPIC_TOOL = "org.apache.kafka.tools.TopicCommand"
QUORUM_TOOL = "org.apache.kafka.tools.MetadataQuorumCommand"
REASSIGN_TOOL = "org.apache.kafka.tools.reassign.ReassignPartitionsCommand"
CONFIG_TOOL = "kafka.admin.ConfigCommand"


class KafkaJoinError(PayctlError):
    """The quorum change, the reassignment or the config change did not complete."""


@dataclass(frozen=True)
class KafkaHost:
    """A node with the Kafka jars, from which the tools run."""

    name: str
    io: NodeIO
    lib: str  # the jar directory on the node
    workdir: str  # a 0700 directory for the reassignment file

    def tool(self, main: str, args: str, what: str) -> str:
        ok, out, err = self.io.run(f"{JVM} -cp {shlex.quote(self.lib)}/'*' {main} {args} 2>&1")
        if not ok:
            raise KafkaJoinError(f"{self.name}: {what} failed: {(out + err).strip()[-600:]}")
        return out


@dataclass(frozen=True)
class Partition:
    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class Topic:
    name: str
    configs: Mapping[str, str]
    partitions: tuple[Partition, ...]


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip().lstrip("-").isdigit())


def parse_topics(out: str) -> list[Topic]:
    """``kafka-topics --describe`` output: a header line per topic (with its Configs), a line per partition."""
    topics: dict[str, tuple[dict[str, str], list[Partition]]] = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+):\s*([^\t]*)", line))
        if "Topic" not in fields:
            continue
        name = fields["Topic"].strip()
        if "Partition" in fields and "Leader" in fields:
            part = Partition(name, int(fields["Partition"]), int(fields["Leader"] or -1),
                             _ids(fields.get("Replicas", "")), _ids(fields.get("Isr", "")))  # fmt: skip
            topics.setdefault(name, ({}, []))[1].append(part)
        elif "PartitionCount" in fields:
            raw = fields.get("Configs", "").strip()
            configs = dict(kv.split("=", 1) for kv in raw.split(",") if "=" in kv)
            topics.setdefault(name, ({}, []))[0].update(configs)
    return [Topic(n, c, tuple(sorted(p, key=lambda x: x.partition))) for n, (c, p) in sorted(topics.items())]


def reassignment(topics: Sequence[Topic], brokers: Sequence[int], rf: int) -> dict[str, object]:
    """The partitions that lack replicas, with the missing brokers appended (spread by partition number so the
    extra replicas do not all land on one broker when there are more brokers than needed). Pure."""
    moves = []
    for t in topics:
        for p in t.partitions:
            if len(p.replicas) >= rf:
                continue
            others = [b for b in brokers if b not in p.replicas]
            if not others:
                continue
            shift = p.partition % len(others)
            extra = (others[shift:] + others[:shift])[: rf - len(p.replicas)]
            moves.append({"topic": t.name, "partition": p.partition, "replicas": [*p.replicas, *extra]})
    return {"version": 1, "partitions": moves}


def parse_voters(out: str) -> set[int]:
    """The voter ids in ``kafka-metadata-quorum describe --status`` output (``CurrentVoters: [{"id": 1, ...}]``)."""
    m = re.search(r"CurrentVoters:\s*(\[.*\])", out)
    if not m:
        return set()
    try:
        return {int(v["id"]) for v in json.loads(m.group(1))}
    except (ValueError, KeyError, TypeError):
        return set(int(x) for x in re.findall(r'"id":\s*(\d+)', m.group(1)))


def voters(host: KafkaHost, controllers: str, wait_s: float = 60.0,
           sleep: Callable[[float], None] = time.sleep) -> set[int]:  # fmt: skip
    """The current voter ids; a controller that does not answer yet ("Timed out waiting for a node assignment",
    seen right after add-node's restarts) is asked again for up to ``wait_s``."""
    return _retrying(lambda: parse_voters(host.tool(
        QUORUM_TOOL, f"--bootstrap-controller {shlex.quote(controllers)} describe --status",
        "kafka-metadata-quorum describe")), wait_s, sleep)  # fmt: skip


def _retrying(call: Callable[[], T], wait_s: float, sleep: Callable[[float], None]) -> T:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except KafkaJoinError:
            if time.monotonic() > deadline:
                raise
            sleep(2.0)


def add_controllers(first: KafkaHost, new: Sequence[tuple[KafkaHost, int, str]], controllers: str,
                    timeout_s: float = 120.0, step: Callable[[str], None] = lambda s: None,
                    sleep: Callable[[float], None] = time.sleep) -> set[int]:  # fmt: skip
    """Make each (host, node id, its properties file) a voter, one at a time; returns the voters at the end."""
    for host, node_id, props in new:
        if node_id in voters(first, controllers):
            step(f"{host.name} (node {node_id}) is already a KRaft voter")
            continue
        step(f"{host.name}: kafka-metadata-quorum add-controller (node {node_id})")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                host.tool(QUORUM_TOOL, f"--bootstrap-controller {shlex.quote(controllers)} --command-config "
                          f"{shlex.quote(props)} add-controller", "add-controller")  # fmt: skip
            except KafkaJoinError as exc:
                if node_id in voters(first, controllers):
                    break  # the earlier attempt went through after all
                if time.monotonic() > deadline:
                    raise KafkaJoinError(f"{host.name} did not join the KRaft quorum within {timeout_s:.0f}s: "
                                         f"{exc.message}",
                                         hint="see the node's logs/payctl-kafka.log") from exc  # fmt: skip
                sleep(2.0)
                continue
            break
        deadline = time.monotonic() + timeout_s
        while node_id not in voters(first, controllers):
            if time.monotonic() > deadline:
                raise KafkaJoinError(f"{host.name} (node {node_id}) is not listed as a voter {timeout_s:.0f}s "
                                     "after add-controller")  # fmt: skip
            sleep(1.0)
    return voters(first, controllers)


def describe(host: KafkaHost, bootstrap: str, wait_s: float = 120.0,
             sleep: Callable[[float], None] = time.sleep) -> list[Topic]:  # fmt: skip
    """The topics and their partitions. A broker that is restarting (the phase-5 apply just before restarts the
    brokers whose config changed: seen in CI as "node 1 being disconnected") is waited for up to ``wait_s``."""
    return _retrying(lambda: parse_topics(host.tool(
        TOPIC_TOOL, f"--bootstrap-server {shlex.quote(bootstrap)} --describe", "kafka-topics --describe")),
        wait_s, sleep)  # fmt: skip


def raise_replication(host: KafkaHost, bootstrap: str, brokers: Sequence[int], rf: int, min_isr: int,
                      timeout_s: float = 300.0, step: Callable[[str], None] = lambda s: None,
                      sleep: Callable[[float], None] = time.sleep) -> list[Topic]:  # fmt: skip
    """Reassign every under-replicated partition to ``rf`` brokers, wait for the ISR, then set each topic's own
    ``min.insync.replicas`` to ``min_isr``. Idempotent: a second run finds nothing to move. Returns the topics."""
    topics = describe(host, bootstrap, sleep=sleep)
    plan = reassignment(topics, brokers, rf)
    moves = plan["partitions"]
    assert isinstance(moves, list)
    if moves:
        step(f"reassign {len(moves)} partition(s) of {len({m['topic'] for m in moves})} topic(s) to RF {rf}")
        path = f"{host.workdir}/reassign.json"
        host.io.run(f"mkdir -p {shlex.quote(host.workdir)} && chmod 700 {shlex.quote(host.workdir)}")
        host.io.put_private(path, json.dumps(plan))
        host.tool(REASSIGN_TOOL, f"--bootstrap-server {shlex.quote(bootstrap)} --reassignment-json-file "
                  f"{shlex.quote(path)} --execute", "kafka-reassign-partitions --execute")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        topics = describe(host, bootstrap, sleep=sleep)
        short = [f"{p.topic}-{p.partition} (ISR {list(p.isr)})" for t in topics for p in t.partitions
                 if len(p.replicas) < rf or len(p.isr) < rf]  # fmt: skip
        if not short:
            break
        if time.monotonic() > deadline:
            raise KafkaJoinError(f"{len(short)} partition(s) below {rf} in-sync replicas after {timeout_s:.0f}s: "
                                 f"{', '.join(short[:5])}",
                                 hint="check the brokers' logs; running again resumes")  # fmt: skip
        sleep(1.0)
    if moves:
        path = f"{host.workdir}/reassign.json"
        host.tool(REASSIGN_TOOL, f"--bootstrap-server {shlex.quote(bootstrap)} --reassignment-json-file "
                  f"{shlex.quote(path)} --verify", "kafka-reassign-partitions --verify")  # fmt: skip
        host.io.run(f"rm -f {shlex.quote(host.workdir + '/reassign.json')}")
    for t in topics:
        if t.name.startswith("__") or t.configs.get("min.insync.replicas") == str(min_isr):
            continue
        step(f"{t.name}: min.insync.replicas={min_isr}")
        host.tool(CONFIG_TOOL, f"--bootstrap-server {shlex.quote(bootstrap)} --alter --entity-type topics "
                  f"--entity-name {shlex.quote(t.name)} --add-config min.insync.replicas={min_isr}",
                  "kafka-configs --alter")  # fmt: skip
    return describe(host, bootstrap)
