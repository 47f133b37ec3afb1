"""The capacity plan's data: frozen dataclasses the renderer, the deploy and ``payctl plan`` read.

``payctl.plan.make_plan`` builds them (and re-exports every name here); ``payctl.sizing`` holds the arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from payctl.inventory import Component

#: Ports every component listens on (per node; lab hosts each have their own network namespace).
PORTS: Mapping[str, int] = {
    "app": 8080,  # the API and its /metrics
    "relay_metrics": 9401,
    "consumer_metrics": 9402,
    "mariadb": 3306,
    "redis": 6379,
    "sentinel": 26379,
    "kafka": 9092,
    "kafka_controller": 9093,
    "http": 80,
    "https": 443,
    "nginx_status": 8081,  # stub_status for the exporter, private address only
    "prometheus": 9090,
    "node_exporter": 9100,
    "mysqld_exporter": 9104,
    "redis_exporter": 9121,
    "nginx_exporter": 9113,
    "kafka_exporter": 9404,  # the Prometheus JMX exporter java agent inside each Kafka JVM (native runtime)
    "grafana": 3000,
}


@dataclass(frozen=True)
class Calibration:
    """CPU cost model: milliseconds of one core per authorize-equivalent request, per component.

    The defaults come from the measured baseline (ENVIRONMENT.md): one app process on one core saturates at ~2900
    authorize/s (0.35 ms/request); MariaDB, Redis, nginx and Kafka shares are estimates. ``payctl verify`` can
    produce a measured Calibration that replaces them.
    """

    app_ms: float = 0.35
    mariadb_ms: float = 0.12
    redis_ms: float = 0.03
    nginx_ms: float = 0.05
    kafka_ms: float = 0.04
    relay_ms: float = 0.03
    consumer_ms: float = 0.05
    utilization: float = 0.7  # plan for 70 % busy: beyond that queueing pushes p95 past the gate's bound
    source: str = "defaults from the measured baseline in ENVIRONMENT.md"

    @classmethod
    def from_measured(cls, knee_rps: float, app_cpus: float, mix: float = 1.0, source: str = "measured") -> Calibration:
        """Replace the app cost with a measurement: ``knee_rps`` requests/s (of a gate ``mix`` in
        authorize-equivalents) saturated an app tier holding ``app_cpus`` CPUs."""
        if knee_rps <= 0 or app_cpus <= 0:
            raise ValueError("knee_rps and app_cpus must be > 0")
        return cls(app_ms=app_cpus * 1000 / (knee_rps * mix), source=source)


@dataclass(frozen=True)
class LiveRoles:
    """Who holds a role now (read from the hosts); wins over the inventory's order after a failover."""

    mariadb_primary: str | None = None
    redis_master: str | None = None


@dataclass(frozen=True)
class Explained:
    key: str
    value: str
    why: str


@dataclass(frozen=True)
class Port:
    name: str
    port: int
    address: str
    public: bool = False


@dataclass(frozen=True)
class ComponentPlan:
    name: Component
    role: str  # e.g. primary/replica, master/replica, broker+controller, controller, lb; "" when it has none
    cpus: float
    memory_mb: int
    ports: tuple[Port, ...]


@dataclass(frozen=True)
class AppPlan:
    workers: int
    db_pool_per_worker: int
    db_pool_timeout_ms: int | None  # phase 3 (pool_timeouts); None: the app's default
    bind_address: str
    port: int
    env: tuple[tuple[str, str], ...]  # non-secret PAYAPP_* settings; DB/Redis URLs with secrets come from render


@dataclass(frozen=True)
class WorkerPlan:
    """The outbox relay or the event consumer."""

    processes: int
    db_pool: int
    metrics_port: int


@dataclass(frozen=True)
class MariaDBPlan:
    role: str  # primary | replica
    server_id: int
    innodb_buffer_pool_size_mb: int
    max_connections: int
    binlog_expire_days: int
    read_only: bool
    primary_address: str


@dataclass(frozen=True)
class RedisPlan:
    role: str  # master | replica
    maxmemory_mb: int
    maxmemory_policy: str
    replicaof: str | None  # the master's address on replicas
    master_address: str


@dataclass(frozen=True)
class SentinelPlan:
    master_name: str
    master_address: str
    quorum: int
    port: int


@dataclass(frozen=True)
class KafkaNodePlan:
    node_id: int
    process_roles: str  # "broker,controller" | "controller" | "broker"
    heap_mb: int
    retention_hours: int | None  # None on a controller-only node (no topic data)


@dataclass(frozen=True)
class NginxPlan:
    worker_processes: int
    worker_connections: int
    listen_address: str  # public address when the node has one
    upstreams: tuple[str, ...]  # "address:port" of every app node
    upstream_keepalive: int
    max_fails: int
    fail_timeout_s: int
    tls: bool = False  # HTTPS on 443, HTTP on 80 only redirects (inventory tls.enabled)


@dataclass(frozen=True)
class PrometheusPlan:
    retention_days: int
    retention_size_gb: int
    targets: tuple[tuple[str, str], ...]  # (job, "address:port")


@dataclass(frozen=True)
class DiskItem:
    name: str
    gb: float
    why: str


@dataclass(frozen=True)
class DiskPlan:
    disk_gb: float
    items: tuple[DiskItem, ...]

    @property
    def used_gb(self) -> float:
        return round(sum(i.gb for i in self.items), 1)


@dataclass(frozen=True)
class NodePlan:
    name: str
    active: bool  # False: listed in the inventory, joins in a later phase
    private_address: str
    public_address: str | None
    prefix: str
    roles: tuple[str, ...]
    cpus: float
    memory_mb: int
    reserve_cpus: float
    reserve_memory_mb: int
    components: tuple[ComponentPlan, ...]
    app: AppPlan | None = None
    relay: WorkerPlan | None = None
    consumer: WorkerPlan | None = None
    mariadb: MariaDBPlan | None = None
    redis: RedisPlan | None = None
    sentinel: SentinelPlan | None = None
    kafka: KafkaNodePlan | None = None
    nginx: NginxPlan | None = None
    prometheus: PrometheusPlan | None = None
    disk: DiskPlan | None = None
    predicted_rps: int = 0
    predicted_bottleneck: str = ""  # the node's request-path process that saturates first

    def component(self, name: str) -> ComponentPlan | None:
        return next((c for c in self.components if c.name == name), None)

    @property
    def cpus_allocated(self) -> float:
        return round(sum(c.cpus for c in self.components), 2)

    @property
    def memory_allocated_mb(self) -> int:
        return sum(c.memory_mb for c in self.components)


@dataclass(frozen=True)
class Topology:
    mariadb_primary: str
    mariadb_replicas: tuple[str, ...]
    redis_master: str
    redis_replicas: tuple[str, ...]
    sentinels: tuple[str, ...]  # empty: Redis failover is manual (payctl failover redis)
    sentinel_quorum: int
    kafka_brokers: tuple[str, ...]
    kafka_controllers: tuple[str, ...]
    lb: str
    lb_upstreams: tuple[str, ...]  # app node names behind the LB


@dataclass(frozen=True)
class KafkaClusterPlan:
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    bootstrap_servers: str  # "addr:9092,..."
    controller_quorum_bootstrap: str  # "addr:9093,..." (dynamic quorum, KIP-853)


@dataclass(frozen=True)
class RateLimitPlan:
    authorize: int
    capture: int
    refund: int
    void: int
    scope: str  # "cluster": one counter per merchant and action in Redis, shared by every app process
    per_merchant_rps: tuple[tuple[str, float], ...]  # what the gate sends one merchant, per action


@dataclass(frozen=True)
class Capacity:
    per_node: tuple[tuple[str, int, str], ...]  # (node, predicted rps, bottleneck component)
    total_rps: int
    bottleneck: str
    gate_rps: int
    target_rps: int
    calibration: str


@dataclass(frozen=True)
class Plan:
    deployment: str
    runtime: str
    phase: int
    features: tuple[str, ...]
    nodes: tuple[NodePlan, ...]
    topology: Topology
    kafka: KafkaClusterPlan
    rate_limits: RateLimitPlan
    capacity: Capacity
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    explanations: tuple[Explained, ...] = field(default=(), compare=False)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def active_nodes(self) -> tuple[NodePlan, ...]:
        return tuple(n for n in self.nodes if n.active)

    def why(self, key: str) -> str:
        return next((e.why for e in self.explanations if e.key == key), "")
