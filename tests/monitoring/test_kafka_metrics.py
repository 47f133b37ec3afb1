"""Kafka broker metrics: the Prometheus JMX exporter java agent (from Maven Central, with the broker jars) inside real
Apache Kafka JVMs, with payctl's rendered rules file: every metric the monitoring reads is served, and a broker whose
follower is gone reports its partitions under-replicated."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payctl.monitoring import METRICS
from payctl.render import JMX_EXPORTER_CONFIG, JMX_EXPORTER_JAR
from tests.monitoring.conftest import REPO, rendered
from tests.support.kafka import Kafka, ensure_jars
from tests.support.services import free_port, wait_until

KAFKA_METRICS = sorted(m for m, job in METRICS.items() if job == "kafka")


def test_the_pom_ships_the_agent_jar_render_names() -> None:
    pom = (REPO / "packaging" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<jmx.exporter.version>(.+)</jmx.exporter.version>", pom)
    assert version is not None and f"jmx_prometheus_javaagent-{version.group(1)}.jar" == JMX_EXPORTER_JAR
    assert "<artifactId>jmx_prometheus_javaagent</artifactId>" in pom


def test_native_kafka_nodes_run_the_agent_and_are_scraped() -> None:
    files = rendered("lab-2node", 5)
    sup = files["node1/supervisor/supervisord.conf"]
    agent = re.search(r"-javaagent:(\S+)=(\S+):(\d+):(\S+) ", sup)
    assert agent is not None
    assert agent.group(1).endswith(f"/kafka/lib/{JMX_EXPORTER_JAR}") and agent.groups()[1:3] == ("10.77.0.11", "9404")
    assert agent.group(4).endswith(JMX_EXPORTER_CONFIG) and f"node1/{JMX_EXPORTER_CONFIG}" in files
    prom = files["node1/prometheus/prometheus.yml"]
    assert '- job_name: "kafka"' in prom
    for address in ("10.77.0.11", "10.77.0.12", "10.77.0.13"):  # both brokers and the witness controller
        assert f'"{address}:9404"' in prom
    assert "9404" in files["node2/nftables.conf"]  # reachable from the other node (Prometheus), not public
    before = rendered("lab-1node", 3)  # no exporters before phase 4: no agent, nothing listening on 9404
    assert "-javaagent" not in before["node1/supervisor/supervisord.conf"]
    assert f"node1/{JMX_EXPORTER_CONFIG}" not in before


def test_compose_kafka_runs_the_agent_from_its_mounted_config_dir() -> None:
    files = rendered("ktcloud-2node", 5)
    compose = files["node2/docker-compose.yml"]
    assert (f'KAFKA_OPTS: "-javaagent:/etc/payctl/kafka/{JMX_EXPORTER_JAR}=198.51.100.12:9404:'
            f'/etc/payctl/{JMX_EXPORTER_CONFIG}"') in compose
    assert '"./kafka:/etc/payctl/kafka:ro"' in compose and f"node2/{JMX_EXPORTER_CONFIG}" in files
    # the image's tool scripts read KAFKA_OPTS too: the healthcheck's JVM must not start a second agent on 9404
    assert '"KAFKA_OPTS= /opt/kafka/bin/kafka-broker-api-versions.sh' in compose
    assert '"198.51.100.12:9404"' in files["node1/prometheus/prometheus.yml"]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def _topic_with_records(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("payments", num_partitions=2, replication_factor=2)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait("payments", key=str(i % 2).encode(), value=b"x" * 100)
    finally:
        await producer.stop()


@pytest.mark.slow
def test_brokers_export_the_rules_metrics_and_under_replication(tmp_path: Path) -> None:
    jar = ensure_jars() / JMX_EXPORTER_JAR
    assert jar.is_file(), "run scripts/fetch-kafka (packaging/kafka/pom.xml lists the agent)"
    rules = tmp_path / "jmx-exporter.yml"
    rules.write_text(rendered("lab-1node", 4)[f"node1/{JMX_EXPORTER_CONFIG}"])
    cluster = Kafka(tmp_path / "c", brokers=2)
    cluster._plan()
    ports = {}
    for node in cluster.nodes:
        ports[node.node_id] = free_port()
        node.jvm_args = (f"-javaagent:{jar}=127.0.0.1:{ports[node.node_id]}:{rules}",)
    cluster.start()
    try:
        asyncio.run(_topic_with_records(cluster.bootstrap))
        survivor = cluster.broker_nodes[0].node_id
        m = _scrape(ports[survivor])
        controller = _scrape(ports[cluster.nodes[0].node_id])  # the dedicated KRaft controller
        served = {**m, **controller}
        missing = [k for k in KAFKA_METRICS if not any(n == k or n.startswith(k + "{") for n in served)]
        assert not missing
        assert controller["kafka_controller_active"] == 1  # a broker-only JVM has no controller MBean
        assert _sum(m, "kafka_server_under_replicated_partitions") == 0
        assert _sum(m, "kafka_server_messages_in_total") > 0
        assert m.get('kafka_log_size_bytes{partition="0",topic="payments"}', 0) > 0
        assert sum(v for k, v in m.items() if k.startswith('kafka_network_requests_total{request="Produce"')) > 0

        cluster.stop(broker=1)  # the follower of half the partitions, the leader of the others (they move)
        wait_until(lambda: _sum(_scrape(ports[survivor]), "kafka_server_under_replicated_partitions") == 2, 60,
                   "both partitions under-replicated on the surviving broker", interval=1)  # fmt: skip
        # (kafka_server_isr_shrinks_total stays 0 here: under KRaft the controller drops a stopped broker from the ISR
        # when it fences it; the leader's own shrink, which the counter counts, is for a live follower that lags.)
    finally:
        cluster.remove()
