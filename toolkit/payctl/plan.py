"""The capacity plan: from an inventory and a phase, every limit and derived setting, each with a short reason.

Pure functions, no I/O. ``make_plan(inventory, phase)`` returns a frozen ``Plan`` that the renderer reads (ports,
roles, limits, settings, the app's environment) and ``payctl plan`` prints. A plan that does not fit its nodes (CPU,
memory or disk over-commit, a phase the inventory cannot carry) raises one ``ConfigError`` listing every problem,
unless over-commit is allowed (``allow_overcommit`` or ``overrides.allow_overcommit``), which turns those into warnings.
docs/capacity-plan.md explains the model; the constants below are its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from payctl.errors import ConfigError
from payctl.inventory import Component, Inventory, Node
from payctl.phase import Phase

# ------------------------------------------------------------------------------------------------ constants

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
    "grafana": 3000,
}

# Share of a node's CPU / memory (after the OS reserve) each component gets when not overridden, with floors and
# ceilings. Weights are relative: only the components a node runs in the phase share the node.
CPU_WEIGHT: Mapping[Component, float] = {
    "app": 40, "relay": 4, "consumer": 8, "mariadb": 20, "redis": 6, "sentinel": 1, "kafka": 10, "nginx": 5,
    "prometheus": 4, "exporters": 2, "grafana": 2,
}  # fmt: skip
CPU_MIN: Mapping[Component, float] = {
    "app": 0.25, "relay": 0.05, "consumer": 0.05, "mariadb": 0.1, "redis": 0.05, "sentinel": 0.05, "kafka": 0.1,
    "nginx": 0.05, "prometheus": 0.05, "exporters": 0.05, "grafana": 0.05,
}  # fmt: skip
CPU_MAX: Mapping[Component, float] = {"sentinel": 0.25, "exporters": 0.5, "grafana": 0.5, "relay": 1.0}
MEM_WEIGHT: Mapping[Component, float] = {
    "app": 14, "relay": 3, "consumer": 5, "mariadb": 40, "redis": 10, "sentinel": 1, "kafka": 14, "nginx": 2,
    "prometheus": 8, "exporters": 2, "grafana": 3,
}  # fmt: skip
MEM_MIN_MB: Mapping[Component, int] = {
    "app": 192, "relay": 96, "consumer": 128, "mariadb": 384, "redis": 96, "sentinel": 32, "kafka": 384,
    "nginx": 32, "prometheus": 192, "exporters": 64, "grafana": 96,
}  # fmt: skip
MEM_MAX_MB: Mapping[Component, int] = {"sentinel": 128, "exporters": 512, "grafana": 1024, "nginx": 1024}
#: A Kafka process that is only a KRaft controller (the witness) holds metadata only.
KAFKA_CONTROLLER_MIN_MB = 256

#: Kept for the OS, sshd, the container runtime and page cache of small files.
RESERVE_CPU_FRACTION, RESERVE_CPU_MIN = 0.0625, 0.1
RESERVE_MEM_FRACTION, RESERVE_MEM_MIN_MB = 0.10, 256

#: Average load as a fraction of the target RPS, for data volumes per day (the target is a peak).
AVERAGE_LOAD_FRACTION = 0.10
BINLOG_BYTES_PER_REQUEST = 1200  # ROW images of payment, 2 ledger rows, outbox and idempotency rows
KAFKA_BYTES_PER_REQUEST = 600  # one event per state change, before compression
KAFKA_PARTITIONS = 12  # fixed at the first deployment: keys must never move to another partition
DB_HOLD_MS = 2.0  # time a request holds its DB connection (one short transaction)
MAX_CONNECTIONS_HEADROOM = 20  # admin, migrations, exporter, replication, backups
CONSUMER_DB_POOL = 4
RELAY_DB_POOL = 2


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


#: Request cost relative to an authorize (the gate's mix is converted to authorize-equivalents).
ACTION_COST: Mapping[str, float] = {"authorize": 1.0, "capture": 1.0, "refund": 1.0, "void": 0.8, "get": 0.4}


@dataclass(frozen=True)
class LiveRoles:
    """Who holds a role now (read from the hosts); wins over the inventory's order after a failover."""

    mariadb_primary: str | None = None
    redis_master: str | None = None


# ------------------------------------------------------------------------------------------------ the plan


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


# ------------------------------------------------------------------------------------------------ arithmetic


def _g(x: float) -> str:
    return f"{x:g}"


class _Book:
    """Collects explanations, problems (errors), over-commit problems, warnings and notes while planning."""

    def __init__(self) -> None:
        self.lines: list[Explained] = []
        self.problems: list[str] = []
        self.overcommit: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def why(self, key: str, value: object, why: str) -> None:
        self.lines.append(Explained(key, _g(value) if isinstance(value, float) else str(value), why))


def _floor_to(x: float, step: float) -> float:
    return round(math.floor(round(x / step, 6)) * step, 4)


def _allocate(
    total: float,
    comps: list[Component],
    fixed: Mapping[Component, float],
    weight: Mapping[Component, float],
    lo: Mapping[Component, float],
    hi: Mapping[Component, float],
    step: float,
) -> dict[Component, float]:
    """Split ``total`` over ``comps`` by weight: overrides first, then floors and ceilings, then the weighted rest."""
    alloc: dict[Component, float] = {c: float(fixed[c]) for c in comps if c in fixed}
    free = [c for c in comps if c not in fixed]
    while free:
        rest = total - sum(alloc.values())
        wsum = sum(weight[c] for c in free)
        shares = {c: rest * weight[c] / wsum for c in free}
        pinned = False
        for c in free:
            if shares[c] < lo[c]:
                alloc[c] = lo[c]
            elif c in hi and shares[c] > hi[c]:
                alloc[c] = hi[c]
            else:
                continue
            free.remove(c)
            pinned = True
            break
        if not pinned:
            for c in free:
                alloc[c] = max(lo[c], _floor_to(shares[c], step))
            free = []
    return alloc


def _components(node: Node, phase: Phase, *, witness_active: bool, sentinels: bool) -> list[Component]:
    """What a node runs in this phase, from its roles and the phase's features."""
    roles = set(node.roles)
    monitoring = phase.has("monitoring")
    if node.is_witness:
        comps: list[Component] = []
        if witness_active:
            if sentinels:
                comps.append("sentinel")
            comps.append("kafka")
            if monitoring:
                comps.append("exporters")
        return comps
    comps = []
    if "app" in roles:
        comps += ["app", "relay"]
    if "consumer" in roles and phase.has("settlement"):
        comps.append("consumer")
    for role in ("mariadb", "redis"):
        if role in roles:
            comps.append(role)
    if sentinels and "redis" in roles:
        comps.append("sentinel")
    if "kafka" in roles:
        comps.append("kafka")
    if "lb" in roles:
        comps.append("nginx")
    if "monitoring" in roles and monitoring:
        comps.append("prometheus")
        if phase.has("grafana"):
            comps.append("grafana")
    if monitoring:
        comps.append("exporters")
    return comps


def _check_requirements(inv: Inventory, phase: Phase, live: LiveRoles, book: _Book) -> None:
    names = [n.name for n in inv.nodes]
    for name in phase.requires.nodes:
        if name not in names:
            book.problems.append(
                f"phase {phase.number} needs a node named '{name}' in the inventory (nodes: {', '.join(names)})"
            )
    app_nodes = [n for n in inv.nodes if "app" in n.roles]
    if len(app_nodes) < phase.requires.min_app_nodes:
        book.problems.append(
            f"phase {phase.number} needs {phase.requires.min_app_nodes} nodes with the role 'app', "
            f"the inventory has {len(app_nodes)}"
        )
    if phase.has("monitoring") and not inv.with_role("monitoring"):
        book.problems.append(f"phase {phase.number} runs monitoring: some node needs the role 'monitoring'")
    for attr, role in (("mariadb_primary", "mariadb"), ("redis_master", "redis")):
        name = getattr(live, attr)
        if name is not None and (name not in names or role not in inv.node(name).roles):
            book.problems.append(f"live roles: {attr} is '{name}', which is not a '{role}' node of the inventory")


def _active(inv: Inventory, phase: Phase) -> tuple[Node, ...]:
    if phase.has("second_node"):
        return inv.nodes
    first = next(n for n in inv.nodes if not n.is_witness)
    return (first,)


def _pick(nodes: Iterable[Node], role: str, live: str | None) -> tuple[str, tuple[str, ...]]:
    names = [n.name for n in nodes if role in n.roles]
    lead = live if live in names else names[0] if names else ""
    return lead, tuple(n for n in names if n != lead)


def _topology(inv: Inventory, phase: Phase, active: tuple[Node, ...], live: LiveRoles, book: _Book) -> Topology:
    db_primary, db_replicas = _pick(active, "mariadb", live.mariadb_primary)
    redis_master, redis_replicas = _pick(active, "redis", live.redis_master)
    witness = next((n for n in active if n.is_witness), None)
    brokers = tuple(n.name for n in active if "kafka" in n.roles and not n.is_witness)
    sentinels: tuple[str, ...] = ()
    if phase.has("redis_replica_sentinel") and redis_replicas:
        if witness is not None:
            sentinels = (redis_master, *redis_replicas, witness.name)
        else:
            book.warnings.append(
                "no witness: payctl does not deploy a two-Sentinel quorum that cannot be safe; Redis failover is "
                "manual (payctl failover redis)"
            )
    quorum = len(sentinels) // 2 + 1 if sentinels else 0
    if len(brokers) > 1 and witness is not None:
        controllers = (*brokers, witness.name)
    else:
        controllers = brokers[:1]
        if len(brokers) > 1:
            book.warnings.append(
                f"no witness: one Kafka controller ({brokers[0]}); if that node is lost the cluster has no quorum"
            )
    lb = next((n.name for n in active if "lb" in n.roles), "")
    upstreams = tuple(n.name for n in active if "app" in n.roles)
    for key, value, why in (
        ("topology.mariadb_primary", db_primary, "live role from the hosts" if live.mariadb_primary else
         "first MariaDB node of the inventory (no live role given)"),
        ("topology.redis_master", redis_master, "live role from the hosts" if live.redis_master else
         "first Redis node of the inventory (no live role given)"),
        ("topology.sentinels", ",".join(sentinels) or "-", f"quorum {quorum}: a majority of {len(sentinels)}"
         if sentinels else "Sentinel needs a third voter (the witness) to be safe; none before phase 5"),
        ("topology.kafka_controllers", ",".join(controllers), "KRaft quorum: brokers plus the witness when there is "
         "one, so two-node failover keeps a majority"),
        ("topology.lb_upstreams", ",".join(upstreams), "every active app node; one upstream block from phase 1 so "
         "the public address never changes"),
    ):  # fmt: skip
        book.why(key, value, why)
    return Topology(
        mariadb_primary=db_primary,
        mariadb_replicas=db_replicas,
        redis_master=redis_master,
        redis_replicas=redis_replicas,
        sentinels=sentinels,
        sentinel_quorum=quorum,
        kafka_brokers=brokers,
        kafka_controllers=controllers,
        lb=lb,
        lb_upstreams=upstreams,
    )


def _reserve(node: Node) -> tuple[float, int]:
    mem_mb = int(node.memory_gb * 1024)
    cpus = max(RESERVE_CPU_MIN, _floor_to(node.cpus * RESERVE_CPU_FRACTION, 0.05))
    mem = max(RESERVE_MEM_MIN_MB, int(mem_mb * RESERVE_MEM_FRACTION) // 16 * 16)
    return cpus, mem


def _size_node(
    inv: Inventory, node: Node, comps: list[Component], book: _Book
) -> tuple[dict[Component, float], dict[Component, int]]:
    """CPU and memory limits of every component on the node; over-commit goes to ``book.overcommit``."""
    reserve_cpus, reserve_mem = _reserve(node)
    mem_mb = int(node.memory_gb * 1024)
    lo_mem: dict[Component, float] = {c: float(v) for c, v in MEM_MIN_MB.items()}
    if node.is_witness:
        lo_mem["kafka"] = KAFKA_CONTROLLER_MIN_MB
    fixed_cpu = {c: v for c, v in inv.overrides.cpus.items() if c in comps}
    fixed_mem = {c: float(v) for c, v in inv.overrides.memory_mb.items() if c in comps}
    cpus = _allocate(node.cpus - reserve_cpus, comps, fixed_cpu, CPU_WEIGHT, CPU_MIN, CPU_MAX, 0.05)
    mems = _allocate(
        mem_mb - reserve_mem, comps, fixed_mem, MEM_WEIGHT, lo_mem, {c: float(v) for c, v in MEM_MAX_MB.items()}, 16
    )
    mem = {c: int(v) for c, v in mems.items()}
    for c in comps:
        how = "overrides" if c in fixed_cpu else f"weight {_g(CPU_WEIGHT[c])} of the node's free CPUs"
        book.why(f"{node.name}.{c}.cpus", round(cpus[c], 2), how)
        how = "overrides" if c in fixed_mem else f"weight {_g(MEM_WEIGHT[c])} of the node's free memory"
        book.why(f"{node.name}.{c}.memory_mb", mem[c], how)
    book.why(
        f"{node.name}.reserve.cpus",
        reserve_cpus,
        f"kept for the OS: {RESERVE_CPU_FRACTION:.2%} of the CPUs, at least {RESERVE_CPU_MIN}",
    )
    book.why(
        f"{node.name}.reserve.memory_mb",
        reserve_mem,
        f"kept for the OS: {RESERVE_MEM_FRACTION:.0%} of the memory, at least {RESERVE_MEM_MIN_MB} MB",
    )
    total_cpu = round(sum(cpus.values()), 2)
    if total_cpu > node.cpus - reserve_cpus + 1e-9:
        parts = ", ".join(f"{c} {_g(round(cpus[c], 2))}" for c in comps)
        book.overcommit.append(
            f"{node.name}: CPU limits sum to {_g(total_cpu)} but the node has {_g(node.cpus)} CPUs "
            f"({_g(reserve_cpus)} reserved for the OS): {parts}"
        )
    total_mem = sum(mem.values())
    if total_mem > mem_mb - reserve_mem:
        parts = ", ".join(f"{c} {mem[c]}" for c in comps)
        book.overcommit.append(
            f"{node.name}: memory limits sum to {total_mem} MB but the node has {mem_mb} MB "
            f"({reserve_mem} MB reserved for the OS): {parts}"
        )
    return cpus, mem


def _ports(node: Node, comps: list[Component]) -> dict[Component, tuple[Port, ...]]:
    a = node.private_address
    out: dict[Component, tuple[Port, ...]] = {
        "app": (Port("http", PORTS["app"], a),),
        "relay": (Port("metrics", PORTS["relay_metrics"], a),),
        "consumer": (Port("metrics", PORTS["consumer_metrics"], a),),
        "mariadb": (Port("mysql", PORTS["mariadb"], a),),
        "redis": (Port("redis", PORTS["redis"], a),),
        "sentinel": (Port("sentinel", PORTS["sentinel"], a),),
        "prometheus": (Port("http", PORTS["prometheus"], a),),
        "grafana": (Port("http", PORTS["grafana"], a),),
    }
    kafka: list[Port] = [] if node.is_witness else [Port("broker", PORTS["kafka"], a)]
    out["kafka"] = (*kafka, Port("controller", PORTS["kafka_controller"], a))
    listen = node.public_address or a
    public = node.public_address is not None
    out["nginx"] = (
        Port("http", PORTS["http"], listen, public),
        Port("https", PORTS["https"], listen, public),
        Port("status", PORTS["nginx_status"], "127.0.0.1"),
    )
    exporters = [Port("node_exporter", PORTS["node_exporter"], a)]
    for comp, name in (("mariadb", "mysqld_exporter"), ("redis", "redis_exporter"), ("nginx", "nginx_exporter")):
        if comp in comps:
            exporters.append(Port(name, PORTS[name], a))
    out["exporters"] = tuple(exporters)
    return {c: out[c] for c in comps}


def _disk(
    node: Node, comps: list[Component], inv: Inventory, brokers: int, rf: int, book: _Book
) -> tuple[DiskPlan, int, int, int]:
    """Disk budget; returns it with binlog expiry (days), Kafka retention (hours), Prometheus retention size (GB)."""
    disk = node.disk_gb
    avg_rps = inv.overrides.average_rps or inv.target_rps * AVERAGE_LOAD_FRACTION
    items: list[DiskItem] = []

    def add(name: str, gb: float, why: str) -> float:
        gb = round(gb, 1)
        items.append(DiskItem(name, gb, why))
        book.why(f"{node.name}.disk.{name}_gb", gb, why)
        return gb

    usable = disk - add("os", max(2.0, disk * 0.10), "10 % of the disk, at least 2 GB: OS, packages, images")
    add("logs", max(0.5, usable * 0.05), "5 % (at least 0.5 GB), rotated by size")
    binlog_days = retention_h = prom_gb = 0
    if "kafka" in comps and not node.is_witness:
        per_hour = avg_rps * 3600 * KAFKA_BYTES_PER_REQUEST / 1e9 * rf / max(brokers, 1)
        budget = usable * 0.15
        retention_h = max(24, min(168, math.floor(budget / per_hour) if per_hour else 168))
        add(
            "kafka",
            max(budget, per_hour * retention_h),
            f"{per_hour:.3f} GB/h (avg {avg_rps:g} rps x "
            f"{KAFKA_BYTES_PER_REQUEST} B x RF {rf} / {max(brokers, 1)} brokers) for {retention_h} h retention "
            "(24 h to 7 days)",
        )
    elif "kafka" in comps:
        add("kafka", 1.0, "KRaft metadata log of a controller-only node")
    if "prometheus" in comps:
        prom_gb = max(1, math.floor(usable * 0.10))
        add("prometheus", prom_gb, "10 % of the disk: --storage.tsdb.retention.size, so Prometheus never fills it")
    if "mariadb" in comps:
        per_day = avg_rps * 86400 * BINLOG_BYTES_PER_REQUEST / 1e9
        budget = usable * 0.15
        binlog_days = max(1, min(7, math.floor(budget / per_day) if per_day else 7))
        add(
            "binlog",
            max(budget, per_day * binlog_days),
            f"{per_day:.2f} GB/day (avg {avg_rps:g} rps x "
            f"{BINLOG_BYTES_PER_REQUEST} B) kept {binlog_days} days (1 to 7): replicas and point-in-time recovery "
            "since the last backup",
        )
        add("backups", usable * 0.20, "20 %: the newest full backups that fit (mariadb-backup)")
        data = disk - sum(i.gb for i in items)
        if data < max(1.0, disk * 0.10):
            book.overcommit.append(
                f"{node.name}: disk: {disk:g} GB leaves {data:.1f} GB for MariaDB data after OS, logs, Kafka, "
                f"Prometheus, binlog and backups (at least {max(1.0, disk * 0.10):.1f} GB needed)"
            )
        else:
            add("mariadb_data", data, "the rest of the disk")
    used = sum(i.gb for i in items)
    if used > disk + 0.05:
        book.overcommit.append(f"{node.name}: disk budget {used:.1f} GB exceeds disk_gb {disk:g}")
    return DiskPlan(disk, tuple(items)), binlog_days, retention_h, int(prom_gb)


def _mix_factor(phase: Phase) -> float:
    return sum(w * ACTION_COST[a] for a, w in phase.gate.mix.items())


def _rate_limits(inv: Inventory, phase: Phase, book: _Book) -> RateLimitPlan:
    limits = inv.overrides.rate_limits or phase.rate_limits
    per_merchant: list[tuple[str, float]] = []
    gate = phase.gate
    src = "overrides.rate_limits" if inv.overrides.rate_limits else f"phase {phase.number}"
    for action in ("authorize", "capture", "refund", "void"):
        limit = getattr(limits, action)
        book.why(f"rate_limits.{action}", limit, f"per merchant per minute, one counter for the cluster ({src})")
        rps = gate.rps * gate.mix.get(action, 0.0) / gate.merchants
        per_merchant.append((action, round(rps, 2)))
        if rps > limit / 60:
            need = math.ceil(gate.rps * gate.mix.get(action, 0.0) / (limit / 60))
            book.warnings.append(
                f"rate limit: the phase {phase.number} gate sends one merchant {rps:g} {action}/s but the "
                f"cluster-wide limit allows {limit / 60:g}/s ({limit}/min): expect 429s; spread the load over "
                f">= {need} merchants or raise the limit"
            )
    book.notes.append(
        "rate limits count per merchant and action for the whole cluster (one Redis counter): "
        f"{limits.authorize}/min authorize is {limits.authorize / 60:g}/s per merchant however many nodes run"
    )
    return RateLimitPlan(limits.authorize, limits.capture, limits.refund, limits.void, "cluster", tuple(per_merchant))


def _nginx_connections(gate_rps: int, p99_ms: float) -> int:
    # Concurrent requests at the gate rate when each takes the p99 bound, x2 (client + upstream connection),
    # x4 for bursts and slow clients; rounded up to a power of two, at least 1024.
    need = gate_rps * p99_ms / 1000 * 2 * 4
    return max(1024, 1 << math.ceil(math.log2(max(need, 1))))


def make_plan(
    inventory: Inventory,
    phase: Phase,
    *,
    allow_overcommit: bool = False,
    live_roles: LiveRoles | None = None,
    calibration: Calibration | None = None,
) -> Plan:
    """The capacity plan of ``inventory`` at ``phase``; raises one ConfigError listing every problem."""
    inv = inventory
    live = live_roles or LiveRoles()
    cal = calibration or Calibration()
    book = _Book()
    _check_requirements(inv, phase, live, book)
    if book.problems:
        raise ConfigError(
            f"{inv.deployment}: the inventory cannot carry phase {phase.number}",
            hint="use an inventory with the nodes and roles the phase needs (e.g. a 2-node inventory for phase 5)",
            problems=book.problems,
        )
    active = _active(inv, phase)
    active_names = {n.name for n in active}
    for n in inv.nodes:
        if n.name not in active_names:
            book.notes.append(f"{n.name}: not deployed before phase 5 (joins with scale add-node)")
    single = active[0]
    if len(active) == 1:
        missing = [r for r in ("app", "consumer", "mariadb", "redis", "kafka", "lb") if r not in single.roles]
        if missing:
            book.problems.append(
                f"{single.name}: runs phase {phase.number} alone and needs the roles {', '.join(missing)}"
            )
    topo = _topology(inv, phase, active, live, book)
    witness_active = any(n.is_witness for n in active)
    brokers = len(topo.kafka_brokers)
    rf = min(3, brokers)
    min_isr = 2 if brokers >= 2 else 1
    partitions = inv.overrides.kafka_partitions or KAFKA_PARTITIONS
    book.why("kafka.replication_factor", rf, f"{brokers} broker(s): every partition on every broker (at most 3)")
    book.why(
        "kafka.min_insync_replicas",
        min_isr,
        "2 with two brokers: no acknowledged event is lost; one broker down stops writes and the outbox absorbs them"
        if min_isr == 2
        else "one broker: nothing to wait for",
    )
    book.why(
        "kafka.partitions",
        partitions,
        "overrides.kafka_partitions"
        if inv.overrides.kafka_partitions
        else f"fixed at {KAFKA_PARTITIONS} from the first deployment so keys never move; >= the consumers of the "
        "largest phase",
    )
    allowed = allow_overcommit or inv.overrides.allow_overcommit

    bootstrap = ",".join(f"{inv.node(b).private_address}:{PORTS['kafka']}" for b in topo.kafka_brokers)
    # Pass 1: components, limits and the per-process pools (MariaDB's max_connections needs all of them).
    sized: dict[str, tuple[list[Component], dict[Component, float], dict[Component, int]]] = {}
    apps: dict[str, AppPlan] = {}
    relays: dict[str, WorkerPlan] = {}
    consumers: dict[str, WorkerPlan] = {}
    for node in active:
        comps = _components(node, phase, witness_active=witness_active, sentinels=bool(topo.sentinels))
        cpus, mem = _size_node(inv, node, comps, book)
        sized[node.name] = (comps, cpus, mem)
        if "app" in comps:
            apps[node.name] = _app(inv, node, phase, cpus["app"], mem["app"], cal, bootstrap, book)
        if "relay" in comps:
            relays[node.name] = WorkerPlan(1, RELAY_DB_POOL, PORTS["relay_metrics"])
            book.why(f"{node.name}.relay.db_pool", RELAY_DB_POOL, "one batch transaction at a time, plus one spare")
            book.why(
                f"{node.name}.relay.processes",
                1,
                "one relay per app node; they share the outbox with SELECT ... FOR UPDATE SKIP LOCKED",
            )
        if "consumer" in comps:
            procs = max(1, math.ceil(cpus["consumer"] - 1e-9))
            consumers[node.name] = WorkerPlan(procs, CONSUMER_DB_POOL, PORTS["consumer_metrics"])
            book.why(f"{node.name}.consumer.processes", procs, "ceil(consumer CPUs): one asyncio process per core")
            book.why(
                f"{node.name}.consumer.db_pool",
                CONSUMER_DB_POOL,
                "settlement and reconciliation write in few, short transactions",
            )
    total_consumers = sum(c.processes for c in consumers.values())
    if total_consumers > partitions:
        book.warnings.append(f"{total_consumers} consumer processes but {partitions} partitions: some stay idle")
    pools = sum(a.workers * a.db_pool_per_worker for a in apps.values())
    pools += sum(r.processes * r.db_pool for r in relays.values())
    pools += sum(c.processes * c.db_pool for c in consumers.values())
    max_conn = pools + max(MAX_CONNECTIONS_HEADROOM, math.ceil(pools * 0.2))
    book.why(
        "mariadb.max_connections",
        max_conn,
        f"sum of every app, relay and consumer pool of all nodes ({pools}) "
        f"+ headroom max({MAX_CONNECTIONS_HEADROOM}, 20 %) for admin, migrations, exporter, replication; the "
        "same on replicas, which may be promoted",
    )

    primary = inv.node(topo.mariadb_primary) if topo.mariadb_primary else None
    redis_master = inv.node(topo.redis_master) if topo.redis_master else None
    nodes: list[NodePlan] = []
    index = {n.name: i + 1 for i, n in enumerate(inv.nodes)}
    for node in inv.nodes:
        reserve_cpus, reserve_mem = _reserve(node)
        base = NodePlan(
            name=node.name,
            active=False,
            private_address=node.private_address,
            public_address=node.public_address,
            prefix=inv.node_prefix(node.name),
            roles=tuple(node.roles),
            cpus=node.cpus,
            memory_mb=int(node.memory_gb * 1024),
            reserve_cpus=reserve_cpus,
            reserve_memory_mb=reserve_mem,
            components=(),
        )
        if node.name not in sized:
            nodes.append(base)
            continue
        comps, cpus, mem = sized[node.name]
        ports = _ports(node, comps)
        disk, binlog_days, retention_h, prom_gb = _disk(node, comps, inv, brokers, rf, book)
        role = {
            "mariadb": "primary" if node.name == topo.mariadb_primary else "replica",
            "redis": "master" if node.name == topo.redis_master else "replica",
            "kafka": _kafka_roles(node.name, topo),
            "nginx": "lb",
        }
        components = tuple(ComponentPlan(c, role.get(c, ""), round(cpus[c], 2), mem[c], ports[c]) for c in comps)
        mariadb: MariaDBPlan | None = None
        if "mariadb" in comps and primary is not None:
            mariadb = _mariadb(
                node,
                index[node.name],
                role["mariadb"],
                mem["mariadb"],
                max_conn,
                binlog_days,
                primary.private_address,
                book,
            )
        redis: RedisPlan | None = None
        sentinel: SentinelPlan | None = None
        if "redis" in comps and redis_master is not None:
            redis = _redis(node, role["redis"], mem["redis"], redis_master.private_address, book)
        if "sentinel" in comps and redis_master is not None:
            sentinel = SentinelPlan("payctl", redis_master.private_address, topo.sentinel_quorum, PORTS["sentinel"])
            book.why(f"{node.name}.sentinel.quorum", topo.sentinel_quorum, "a majority of the Sentinels must agree")
        kafka_node: KafkaNodePlan | None = None
        if "kafka" in comps:
            heap = max(128, int(mem["kafka"] * 0.5) // 64 * 64)
            book.why(
                f"{node.name}.kafka.heap_mb",
                heap,
                "half the Kafka memory limit (multiple of 64 MB): the rest is page cache, which Kafka reads and "
                "writes through",
            )
            kafka_node = KafkaNodePlan(index[node.name], role["kafka"], heap, retention_h or None)
            book.why(f"{node.name}.kafka.node_id", index[node.name], "the node's position in the inventory")
            if retention_h:
                book.why(f"{node.name}.kafka.retention_hours", retention_h, "from the disk budget (Kafka share)")
        nginx = _nginx(node, cpus["nginx"], inv, phase, topo, book) if "nginx" in comps else None
        prometheus: PrometheusPlan | None = None
        if "prometheus" in comps:
            prometheus = PrometheusPlan(15, max(1, int(prom_gb * 0.9)), _targets(inv, sized))
            book.why(f"{node.name}.prometheus.retention_days", 15, "two weeks of history; the size bound may cut it")
            book.why(
                f"{node.name}.prometheus.retention_size_gb",
                prometheus.retention_size_gb,
                "90 % of its disk share, so the TSDB never outgrows it",
            )
        node_rps, node_bottleneck = _node_capacity(comps, cpus, cal, _mix_factor(phase))
        nodes.append(
            replace(
                base,
                active=True,
                components=components,
                app=apps.get(node.name),
                relay=relays.get(node.name),
                consumer=consumers.get(node.name),
                mariadb=mariadb,
                redis=redis,
                sentinel=sentinel,
                kafka=kafka_node,
                nginx=nginx,
                prometheus=prometheus,
                disk=disk,
                predicted_rps=node_rps,
                predicted_bottleneck=node_bottleneck,
            )
        )
    capacity = _capacity(nodes, topo, phase, inv, cal, book)
    rate_limits = _rate_limits(inv, phase, book)
    kafka = KafkaClusterPlan(
        partitions=partitions,
        replication_factor=rf,
        min_insync_replicas=min_isr,
        bootstrap_servers=bootstrap,
        controller_quorum_bootstrap=",".join(
            f"{inv.node(c).private_address}:{PORTS['kafka_controller']}" for c in topo.kafka_controllers
        ),
    )
    if book.overcommit and allowed:
        book.warnings += [f"over-commit allowed: {p}" for p in book.overcommit]
    elif book.overcommit:
        book.problems += book.overcommit
    if book.problems:
        raise ConfigError(
            f"{inv.deployment}: the capacity plan for phase {phase.number} does not fit",
            hint="lower overrides.cpus/memory_mb, use bigger nodes, or pass --allow-overcommit to plan anyway",
            problems=book.problems,
        )
    return Plan(
        deployment=inv.deployment,
        runtime=inv.runtime,
        phase=phase.number,
        features=tuple(phase.features),
        nodes=tuple(nodes),
        topology=topo,
        kafka=kafka,
        rate_limits=rate_limits,
        capacity=capacity,
        warnings=tuple(book.warnings),
        notes=tuple(book.notes),
        explanations=tuple(book.lines),
    )


def _kafka_roles(name: str, topo: Topology) -> str:
    roles = [r for r, members in (("broker", topo.kafka_brokers), ("controller", topo.kafka_controllers))
             if name in members]  # fmt: skip
    return ",".join(roles)


def _app(
    inv: Inventory, node: Node, phase: Phase, cpus: float, mem: int, cal: Calibration, bootstrap: str, book: _Book
) -> AppPlan:
    n = node.name
    if inv.overrides.app_workers:
        workers = inv.overrides.app_workers
        book.why(f"{n}.app.workers", workers, "overrides.app_workers")
    else:
        workers = max(1, math.ceil(cpus - 1e-9))
        book.why(
            f"{n}.app.workers",
            workers,
            f"ceil(app CPUs {cpus:g}): one asyncio process uses at most one core; "
            "rounding up lets the workers use the whole quota",
        )
    if mem / workers < 96:
        book.overcommit.append(f"{n}: app memory {mem} MB is less than 96 MB per worker for {workers} workers")
    if inv.overrides.db_pool_per_worker:
        pool = inv.overrides.db_pool_per_worker
        book.why(f"{n}.app.db_pool_per_worker", pool, "overrides.db_pool_per_worker")
    else:
        rps = min(1.0, cpus / workers) * 1000 / cal.app_ms
        pool = max(4, min(32, math.ceil(rps * DB_HOLD_MS / 1000 * 2)))
        book.why(
            f"{n}.app.db_pool_per_worker",
            pool,
            f"a worker's saturating rate ({rps:.0f}/s) x {DB_HOLD_MS} ms "
            "per transaction x 2 for bursts, between 4 and 32",
        )
    timeout_ms: int | None = None
    if phase.has("pool_timeouts"):
        timeout_ms = int(phase.gate.p99_ms * 3)
        book.why(
            f"{n}.app.db_pool_timeout_ms",
            timeout_ms,
            "3 x the gate's p99 bound: a request waiting longer fails fast instead of piling up",
        )
    limits = inv.overrides.rate_limits or phase.rate_limits
    env: list[tuple[str, str]] = [
        ("PAYAPP_HOST", node.private_address),
        ("PAYAPP_PORT", str(PORTS["app"])),
        ("PAYAPP_WORKERS", str(workers)),
        ("PAYAPP_DB_POOL_SIZE", str(pool)),
        ("PAYAPP_KAFKA_BOOTSTRAP", bootstrap),
        ("PAYAPP_RATE_LIMIT_AUTHORIZE", str(limits.authorize)),
        ("PAYAPP_RATE_LIMIT_CAPTURE", str(limits.capture)),
        ("PAYAPP_RATE_LIMIT_REFUND", str(limits.refund)),
        ("PAYAPP_RATE_LIMIT_VOID", str(limits.void)),
    ]
    if timeout_ms is not None:
        env.append(("PAYAPP_DB_POOL_TIMEOUT_MS", str(timeout_ms)))
    if phase.has("producer_batching"):
        env += [("PAYAPP_KAFKA_LINGER_MS", "5"), ("PAYAPP_KAFKA_BATCH_SIZE", "65536")]
        book.why(
            f"{n}.app.kafka_linger_ms",
            5,
            "phase 3 producer batching: 5 ms linger and 64 KB batches trade "
            "a few ms of event latency for far fewer requests",
        )
    return AppPlan(workers, pool, timeout_ms, node.private_address, PORTS["app"], tuple(env))


def _mariadb(
    node: Node, server_id: int, role: str, mem: int, max_conn: int, binlog_days: int, primary: str, book: _Book
) -> MariaDBPlan:
    n = node.name
    bp = min(int(mem * 0.75), mem - 256 - 2 * max_conn) // 128 * 128
    book.why(
        f"{n}.mariadb.innodb_buffer_pool_size_mb",
        bp,
        f"min(75 % of the MariaDB limit {mem} MB, limit - 256 MB - 2 MB x {max_conn} connections), in 128 MB chunks",
    )
    if bp < 128:
        book.overcommit.append(f"{n}: MariaDB memory {mem} MB leaves a buffer pool of {bp} MB (< 128 MB)")
        bp = 128
    book.why(f"{n}.mariadb.server_id", server_id, "the node's position in the inventory: unique and stable")
    book.why(f"{n}.mariadb.role", role, "replicas are read_only and follow the primary with MASTER_USE_GTID")
    book.why(f"{n}.mariadb.max_connections", max_conn, "see mariadb.max_connections")
    book.why(f"{n}.mariadb.binlog_expire_days", binlog_days, "from the disk budget (binlog share)")
    return MariaDBPlan(role, server_id, bp, max_conn, binlog_days, role != "primary", primary)


def _redis(node: Node, role: str, mem: int, master: str, book: _Book) -> RedisPlan:
    maxmemory = int(mem * 0.75) // 16 * 16
    book.why(
        f"{node.name}.redis.maxmemory_mb",
        maxmemory,
        "75 % of the Redis limit: the AOF rewrite fork and client buffers need the rest",
    )
    book.why(
        f"{node.name}.redis.maxmemory_policy",
        "noeviction",
        "rate-limit counters and idempotency leases must "
        "never be evicted silently; a full Redis fails writes loudly instead",
    )
    return RedisPlan(role, maxmemory, "noeviction", master if role == "replica" else None, master)


def _nginx(node: Node, cpus: float, inv: Inventory, phase: Phase, topo: Topology, book: _Book) -> NginxPlan:
    workers = max(1, math.ceil(cpus - 1e-9))
    book.why(f"{node.name}.nginx.worker_processes", workers, f"ceil(nginx CPUs {cpus:g})")
    conns = _nginx_connections(max(phase.gate.rps, inv.target_rps), phase.gate.p99_ms)
    book.why(
        f"{node.name}.nginx.worker_connections",
        conns,
        "rate x p99 x 2 (client + upstream) x 4 for bursts, a power of two, at least 1024",
    )
    ups = tuple(f"{inv.node(u).private_address}:{PORTS['app']}" for u in topo.lb_upstreams)
    book.why(f"{node.name}.nginx.upstream_keepalive", 64, "idle connections kept to the app per nginx worker: no "
             "TCP handshake per request")  # fmt: skip
    book.why(f"{node.name}.nginx.max_fails", 3, "passive health: 3 failures within fail_timeout mark an upstream down")
    book.why(f"{node.name}.nginx.fail_timeout_s", 10, "an upstream marked down is retried after 10 s")
    return NginxPlan(workers, conns, node.public_address or node.private_address, ups, 64, 3, 10)


def _targets(
    inv: Inventory, sized: Mapping[str, tuple[list[Component], dict[Component, float], dict[Component, int]]]
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for name, (comps, _, _) in sized.items():
        a = inv.node(name).private_address
        for comp, job, port in (
            ("app", "payapp", PORTS["app"]),
            ("relay", "relay", PORTS["relay_metrics"]),
            ("consumer", "consumer", PORTS["consumer_metrics"]),
            ("exporters", "node", PORTS["node_exporter"]),
            ("mariadb", "mysqld", PORTS["mysqld_exporter"]),
            ("redis", "redis", PORTS["redis_exporter"]),
            ("nginx", "nginx", PORTS["nginx_exporter"]),
        ):
            if comp in comps and ("exporters" in comps or comp in ("app", "relay", "consumer")):
                out.append((job, f"{a}:{port}"))
    return tuple(out)


def _node_capacity(
    comps: list[Component], cpus: Mapping[Component, float], cal: Calibration, mix: float
) -> tuple[int, str]:
    """Requests/s the node's app tier can take: min over its request-path processes of CPU / cost."""
    costs = {"app": cal.app_ms, "relay": cal.relay_ms, "consumer": cal.consumer_ms}
    best: tuple[int, str] = (0, "-")
    for comp, ms in costs.items():
        if comp in comps:
            rps = int(cpus[comp] * 1000 / (ms * mix) * cal.utilization)
            if best[1] == "-" or rps < best[0]:
                best = (rps, comp)
    return best


def _capacity(
    nodes: list[NodePlan], topo: Topology, phase: Phase, inv: Inventory, cal: Calibration, book: _Book
) -> Capacity:
    mix = _mix_factor(phase)
    by = {n.name: n for n in nodes}

    def rps(node: str, comp: str, ms: float, factor: float = 1.0) -> int:
        c = by[node].component(comp) if node in by else None
        return int(c.cpus * 1000 / (ms * mix * factor) * cal.utilization) if c else 0

    app_tier = sum(n.predicted_rps for n in nodes if n.active and n.app)
    limits = [("app tier", app_tier)]
    if topo.mariadb_primary:
        limits.append((f"mariadb on {topo.mariadb_primary}", rps(topo.mariadb_primary, "mariadb", cal.mariadb_ms)))
    if topo.redis_master:
        limits.append((f"redis on {topo.redis_master}", rps(topo.redis_master, "redis", cal.redis_ms)))
    if topo.lb:
        limits.append((f"nginx on {topo.lb}", rps(topo.lb, "nginx", cal.nginx_ms)))
    if topo.kafka_brokers:
        rf = min(3, len(topo.kafka_brokers))
        kafka = sum(rps(b, "kafka", cal.kafka_ms, rf) for b in topo.kafka_brokers)
        limits.append(("kafka brokers", kafka))
    bottleneck, total = min(limits, key=lambda x: x[1])
    book.why(
        "capacity.total_rps",
        total,
        f"min over app tier, MariaDB primary, Redis master, LB and brokers of "
        f"CPU x 1000 / (ms per request x mix {mix:.2f}) x {cal.utilization:.0%} utilization; bottleneck: "
        f"{bottleneck} ({cal.source})",
    )
    if total < phase.gate.rps:
        book.warnings.append(
            f"predicted capacity {total} rps (bottleneck: {bottleneck}) is below the phase {phase.number} gate "
            f"of {phase.gate.rps} rps"
        )
    elif total < inv.target_rps and all(n.active for n in nodes):
        book.warnings.append(f"predicted capacity {total} rps is below the inventory's target_rps {inv.target_rps}")
    return Capacity(
        per_node=tuple((n.name, n.predicted_rps, n.predicted_bottleneck) for n in nodes if n.active and n.app),
        total_rps=total,
        bottleneck=bottleneck,
        gate_rps=phase.gate.rps,
        target_rps=inv.target_rps,
        calibration=cal.source,
    )


def plan_as_dict(plan: Plan) -> dict[str, object]:
    """The plan as JSON-able data (``payctl plan --json``)."""
    data = asdict(plan)
    for node, raw in zip(plan.nodes, data["nodes"], strict=True):
        raw["cpus_allocated"] = node.cpus_allocated
        raw["memory_allocated_mb"] = node.memory_allocated_mb
        if node.disk is not None:
            raw["disk"]["used_gb"] = node.disk.used_gb
    return data
