"""The plan's arithmetic: CPU and memory limits, derived settings, the disk budget and the capacity model.

Pure functions over the inventory, the phase and what ``payctl.plan`` decided (topology); each records why a number
is what it is in a ``Book``. docs/capacity-plan.md states every rule; the constants below are its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from payctl.inventory import Component, Inventory, Node
from payctl.phase import Phase
from payctl.planmodel import (
    PORTS,
    AppPlan,
    Calibration,
    Capacity,
    DiskItem,
    DiskPlan,
    Explained,
    MariaDBPlan,
    NginxPlan,
    NodePlan,
    Port,
    RedisPlan,
    Topology,
)

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
    "app": 192, "relay": 96, "consumer": 128, "mariadb": 384, "redis": 96, "sentinel": 32, "kafka": 640,
    "nginx": 32, "prometheus": 192, "exporters": 64, "grafana": 96,
}  # fmt: skip
MEM_MAX_MB: Mapping[Component, int] = {"sentinel": 128, "exporters": 512, "grafana": 1024, "nginx": 1024}
#: A broker (with its controller) gets at least 640 MB, a 320 MB heap: at 384 MB (a 192 MB heap) the lab's node1
#: broker ran out of heap after add-node (RF 2 replication, the JMX exporter's scrapes) and thrashed in GC, alive
#: but answering nothing. A Kafka process that is only a KRaft controller (the witness) holds metadata only.
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

#: Request cost relative to an authorize (the gate's mix is converted to authorize-equivalents).
ACTION_COST: Mapping[str, float] = {"authorize": 1.0, "capture": 1.0, "refund": 1.0, "void": 0.8, "get": 0.4}


def fmt_num(x: float) -> str:
    return f"{x:g}"


class Book:
    """Collects explanations, problems (errors), over-commit problems, warnings and notes while planning."""

    def __init__(self) -> None:
        self.lines: list[Explained] = []
        self.problems: list[str] = []
        self.overcommit: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def why(self, key: str, value: object, why: str) -> None:
        self.lines.append(Explained(key, fmt_num(value) if isinstance(value, float) else str(value), why))


def floor_to(x: float, step: float) -> float:
    return round(math.floor(round(x / step, 6)) * step, 4)


def allocate(
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
                alloc[c] = max(lo[c], floor_to(shares[c], step))
            free = []
    return alloc


def reserve(node: Node) -> tuple[float, int]:
    mem_mb = int(node.memory_gb * 1024)
    cpus = max(RESERVE_CPU_MIN, floor_to(node.cpus * RESERVE_CPU_FRACTION, 0.05))
    mem = max(RESERVE_MEM_MIN_MB, int(mem_mb * RESERVE_MEM_FRACTION) // 16 * 16)
    return cpus, mem


def size_node(
    inv: Inventory, node: Node, comps: list[Component], book: Book
) -> tuple[dict[Component, float], dict[Component, int]]:
    """CPU and memory limits of every component on the node; over-commit goes to ``book.overcommit``."""
    reserve_cpus, reserve_mem = reserve(node)
    mem_mb = int(node.memory_gb * 1024)
    lo_mem: dict[Component, float] = {c: float(v) for c, v in MEM_MIN_MB.items()}
    if node.is_witness:
        lo_mem["kafka"] = KAFKA_CONTROLLER_MIN_MB
    fixed_cpu = {c: v for c, v in inv.overrides.cpus.items() if c in comps}
    fixed_mem = {c: float(v) for c, v in inv.overrides.memory_mb.items() if c in comps}
    cpus = allocate(node.cpus - reserve_cpus, comps, fixed_cpu, CPU_WEIGHT, CPU_MIN, CPU_MAX, 0.05)
    mems = allocate(
        mem_mb - reserve_mem, comps, fixed_mem, MEM_WEIGHT, lo_mem, {c: float(v) for c, v in MEM_MAX_MB.items()}, 16
    )
    mem = {c: int(v) for c, v in mems.items()}
    for c in comps:
        how = "overrides" if c in fixed_cpu else f"weight {fmt_num(CPU_WEIGHT[c])} of the node's free CPUs"
        book.why(f"{node.name}.{c}.cpus", round(cpus[c], 2), how)
        how = "overrides" if c in fixed_mem else f"weight {fmt_num(MEM_WEIGHT[c])} of the node's free memory"
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
        parts = ", ".join(f"{c} {fmt_num(round(cpus[c], 2))}" for c in comps)
        book.overcommit.append(
            f"{node.name}: CPU limits sum to {fmt_num(total_cpu)} but the node has {fmt_num(node.cpus)} CPUs "
            f"({fmt_num(reserve_cpus)} reserved for the OS): {parts}"
        )
    total_mem = sum(mem.values())
    if total_mem > mem_mb - reserve_mem:
        parts = ", ".join(f"{c} {mem[c]}" for c in comps)
        book.overcommit.append(
            f"{node.name}: memory limits sum to {total_mem} MB but the node has {mem_mb} MB "
            f"({reserve_mem} MB reserved for the OS): {parts}"
        )
    return cpus, mem


def broker_metrics(comps: Iterable[str]) -> bool:
    """A Kafka node exports JMX through the Prometheus JMX exporter java agent (from Maven Central with the broker
    jars; the deploy ships it in both runtimes) once the node runs exporters (phase 4 on)."""
    names = set(comps)
    return "kafka" in names and "exporters" in names


def ports_of(node: Node, comps: list[Component]) -> dict[Component, tuple[Port, ...]]:
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
    if broker_metrics(comps):
        exporters.append(Port("kafka_exporter", PORTS["kafka_exporter"], a))
    out["exporters"] = tuple(exporters)
    return {c: out[c] for c in comps}


def disk_budget(
    node: Node, comps: list[Component], inv: Inventory, brokers: int, rf: int, book: Book
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


def mix_factor(phase: Phase) -> float:
    return sum(w * ACTION_COST[a] for a, w in phase.gate.mix.items())


def nginx_connections(gate_rps: int, p99_ms: float) -> int:
    # Concurrent requests at the gate rate when each takes the p99 bound, x2 (client + upstream connection),
    # x4 for bursts and slow clients; rounded up to a power of two, at least 1024.
    need = gate_rps * p99_ms / 1000 * 2 * 4
    return max(1024, 1 << math.ceil(math.log2(max(need, 1))))


def app_settings(
    inv: Inventory, node: Node, phase: Phase, cpus: float, mem: int, cal: Calibration, bootstrap: str, book: Book
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
    if phase.has("producer_batching") and phase.producer is not None:
        prod = phase.producer
        env += [
            ("PAYAPP_KAFKA_BATCH_SIZE", str(prod.batch_bytes)),
            ("PAYAPP_KAFKA_LINGER_MS", str(prod.linger_ms)),
            ("PAYAPP_KAFKA_COMPRESSION", prod.compression),
        ]
        book.why(
            f"{n}.app.kafka_linger_ms",
            prod.linger_ms,
            f"phase {phase.number} producer batching ({prod.batch_bytes // 1024} KB batches, {prod.compression}): "
            "a few ms of event latency for far fewer broker requests",
        )
    return AppPlan(workers, pool, timeout_ms, node.private_address, PORTS["app"], tuple(env))


def mariadb_settings(
    node: Node, server_id: int, role: str, mem: int, max_conn: int, binlog_days: int, primary: str, book: Book
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


def redis_settings(node: Node, role: str, mem: int, master: str, book: Book) -> RedisPlan:
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


def nginx_settings(node: Node, cpus: float, inv: Inventory, phase: Phase, topo: Topology, book: Book) -> NginxPlan:
    workers = max(1, math.ceil(cpus - 1e-9))
    book.why(f"{node.name}.nginx.worker_processes", workers, f"ceil(nginx CPUs {cpus:g})")
    conns = nginx_connections(max(phase.gate.rps, inv.target_rps), phase.gate.p99_ms)
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
    return NginxPlan(workers, conns, node.public_address or node.private_address, ups, 64, 3, 10, inv.tls.enabled)


def prometheus_targets(
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
            ("kafka", "kafka", PORTS["kafka_exporter"]),
        ):
            if comp == "kafka" and not broker_metrics(comps):
                continue
            if comp in comps and ("exporters" in comps or comp in ("app", "relay", "consumer")):
                out.append((job, f"{a}:{port}"))
    return tuple(out)


def node_capacity(
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


def cluster_capacity(
    nodes: list[NodePlan], topo: Topology, phase: Phase, inv: Inventory, cal: Calibration, book: Book
) -> Capacity:
    mix = mix_factor(phase)
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
