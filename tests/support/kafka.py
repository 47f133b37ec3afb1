"""A real Apache Kafka (KRaft, no ZooKeeper) for tests and the lab, run from the jars scripts/fetch-kafka copies.

`Kafka(base).start()` runs one combined broker+controller on free loopback ports (the default, ~4 s to start);
`Kafka(base, brokers=2).start()` runs one dedicated controller and two brokers, so a topic can have RF 2 with
min.insync.replicas and one broker can be stopped and restarted while the other serves. Every process is started
here and stopped by its pid; data lives under `base`. The recipe is in docs/kafka.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import _port_open, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
LIB = Path(os.environ.get("PAYCTL_KAFKA_LIB", REPO / ".cache" / "kafka" / "lib"))

_LOG4J2 = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""

# Marker the broker logs once it is registered with the controller and serving (KafkaRaftServer, INFO).
_STARTED = "Kafka Server started"


def ensure_jars() -> Path:
    """The jar directory, fetched from Maven Central by scripts/fetch-kafka when it is missing."""
    if not any(LIB.glob("kafka_2.13-*.jar")):
        subprocess.run([str(REPO / "scripts" / "fetch-kafka")], check=True)
    return LIB


@dataclass
class KafkaNode:
    """One JVM: a combined broker+controller, a dedicated controller, or a broker."""

    node_id: int
    roles: str
    base: Path
    port: int | None
    controller_port: int | None
    heap_mb: int
    proc: subprocess.Popen[bytes] | None = None
    _log_mark: int = 0
    jvm_args: tuple[str, ...] = ()  # e.g. the Prometheus JMX exporter's -javaagent (tests/monitoring)

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    @property
    def properties(self) -> Path:
        return self.base / "server.properties"

    @property
    def is_broker(self) -> bool:
        return "broker" in self.roles

    def launch(self, lib: Path) -> None:
        self._log_mark = self.log.stat().st_size if self.log.exists() else 0
        jvm = [
            "java", f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 128)}m", "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.base / 'log4j2.properties'}", *self.jvm_args,
            "-cp", f"{lib}/*", "kafka.Kafka", str(self.properties),
        ]
        out = open(self.base / "stdout.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(jvm, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def started(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"kafka node {self.node_id} exited; see {self.log} and {self.base / 'stdout.log'}")
        if not self.log.exists():
            return False
        with open(self.log, "rb") as f:
            f.seek(self._log_mark)
            text = f.read().decode(errors="replace")
        port = self.port if self.port is not None else self.controller_port
        return _STARTED in text and port is not None and _port_open("127.0.0.1", port)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused JVM cannot handle SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


@dataclass
class Kafka:
    """A private KRaft Kafka: single combined node (brokers=1) or one controller + N brokers (brokers>=2)."""

    base: Path
    brokers: int = 1
    heap_mb: int = 320
    controller_heap_mb: int = 160
    partitions: int = 1
    nodes: list[KafkaNode] = field(default_factory=list)
    cluster_id: str = ""
    jvm_args: tuple[str, ...] = ()  # added to every node's JVM

    @property
    def broker_nodes(self) -> list[KafkaNode]:
        return [n for n in self.nodes if n.is_broker]

    @property
    def bootstrap(self) -> str:
        """Comma-separated host:port list of every broker, for PAYAPP_KAFKA_BOOTSTRAP."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.broker_nodes)

    def _plan(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._plan_nodes()
        for n in self.nodes:
            n.jvm_args = self.jvm_args

    def _plan_nodes(self) -> None:
        if self.brokers <= 1:
            self.nodes = [KafkaNode(1, "broker,controller", self.base / "node1", free_port(), free_port(),
                                    self.heap_mb)]
        else:
            self.nodes = [KafkaNode(1, "controller", self.base / "controller", None, free_port(),
                                    self.controller_heap_mb)]
            self.nodes += [KafkaNode(10 + i, "broker", self.base / f"broker{i}", free_port(), None, self.heap_mb)
                           for i in range(1, self.brokers + 1)]

    def _write(self, node: KafkaNode) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        controller = next(n for n in self.nodes if "controller" in n.roles)
        rf = min(self.brokers, 3)
        listeners, advertised = [], []
        if node.port is not None:
            listeners.append(f"PLAINTEXT://127.0.0.1:{node.port}")
            advertised.append(f"PLAINTEXT://127.0.0.1:{node.port}")
        if node.controller_port is not None:
            listeners.append(f"CONTROLLER://127.0.0.1:{node.controller_port}")
        props = {
            "process.roles": node.roles,
            "node.id": str(node.node_id),
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller.controller_port}",
            "listeners": ",".join(listeners),
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.base / "data"),
            "num.partitions": str(self.partitions),
            # Internal topics must fit the cluster, or consumer groups never get a coordinator.
            "offsets.topic.replication.factor": str(rf),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
            "controlled.shutdown.enable": "true",
            "unclean.leader.election.enable": "false",
        }
        if advertised:
            props["advertised.listeners"] = ",".join(advertised)
            props["inter.broker.listener.name"] = "PLAINTEXT"
        node.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (node.base / "log4j2.properties").write_text(_LOG4J2.format(log=node.log))

    def _format(self, lib: Path, node: KafkaNode) -> None:
        args = ["java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", f"{lib}/*", "kafka.tools.StorageTool",
                "format", f"--cluster-id={self.cluster_id}", "-c", str(node.properties)]
        # "=" form: a base64 id may start with "-", which argparse would take for an option.
        if "controller" in node.roles:
            args.append("--standalone")  # a one-voter dynamic quorum
        else:
            args.append("--no-initial-controllers")
        out = subprocess.run(args, capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {out.stdout.decode()}{out.stderr.decode()}")

    def start(self, timeout: float = 90) -> Kafka:
        lib = ensure_jars()
        if not self.nodes:
            self._plan()
        if not self.cluster_id:
            # StorageTool random-uuid prints a base64 URL-safe 16-byte id; build the same without a JVM.
            import base64

            self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        for node in self.nodes:
            self._write(node)
            if not (node.base / "data" / "meta.properties").exists():
                self._format(lib, node)
        for node in self.nodes:
            node.launch(lib)
        for node in self.nodes:
            wait_until(node.started, timeout, f"kafka node {node.node_id} (log: {node.log})", interval=0.2)
        return self

    def _node(self, index: int | None) -> list[KafkaNode]:
        """index None: every node; otherwise the index-th broker (0-based)."""
        return list(self.nodes) if index is None else [self.broker_nodes[index]]

    def stop(self, broker: int | None = None) -> None:
        """Graceful stop (SIGTERM, controlled shutdown) of one broker or, by default, of everything."""
        targets = self._node(broker)
        for node in reversed(targets):  # brokers before the controller
            node.stop()

    def kill(self, broker: int | None = None) -> None:
        for node in self._node(broker):
            node.kill()

    def start_node(self, broker: int | None = None, timeout: float = 90) -> None:
        """Start stopped nodes again on the same ports and data (what a restart keeps: every committed record)."""
        lib = ensure_jars()
        targets = [n for n in self._node(broker) if n.proc is None]
        for node in targets:
            node.launch(lib)
        for node in targets:
            wait_until(node.started, timeout, f"kafka node {node.node_id} (log: {node.log})", interval=0.2)

    def restart(self, broker: int | None = None) -> None:
        self.stop(broker)
        self.start_node(broker)

    def pause(self, broker: int | None = None) -> None:
        """SIGSTOP: the broker holds its sockets open but answers nothing (a hung broker, not a dead one)."""
        for node in self._node(broker):
            node.signal(signal.SIGSTOP)

    def resume(self, broker: int | None = None) -> None:
        for node in self._node(broker):
            node.signal(signal.SIGCONT)

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def rss_mb(self) -> dict[int, float]:
        """Resident memory per node (from /proc), for docs/kafka.md."""
        out: dict[int, float] = {}
        for n in self.nodes:
            if n.proc is None:
                continue
            for line in Path(f"/proc/{n.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[n.node_id] = int(line.split()[1]) / 1024
        return out


def started_in(kafka: Kafka) -> float:
    """Start `kafka` and return the seconds it took (for the recipe's figures)."""
    t0 = time.monotonic()
    kafka.start()
    return time.monotonic() - t0
