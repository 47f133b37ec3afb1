"""The capacity plan: from an inventory and a phase, every limit and derived setting, each with a short reason.

Pure functions, no I/O. ``make_plan(inventory, phase)`` returns a frozen ``Plan`` that the renderer reads (ports,
roles, limits, settings, the app's environment) and ``payctl plan`` prints. A plan that does not fit its nodes (CPU,
memory or disk over-commit, a phase the inventory cannot carry) raises one ``ConfigError`` listing every problem,
unless over-commit is allowed (``allow_overcommit`` or ``overrides.allow_overcommit``), which turns those into warnings.
docs/capacity-plan.md explains the model. The data classes live in ``payctl.planmodel`` and the arithmetic in
``payctl.sizing``; every public name of both that users need is importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, replace

from payctl.errors import ConfigError
from payctl.inventory import Component, Inventory, Node
from payctl.phase import Phase
from payctl.planmodel import (
    PORTS,
    AppPlan,
    Calibration,
    Capacity,
    ComponentPlan,
    DiskItem,
    DiskPlan,
    Explained,
    KafkaClusterPlan,
    KafkaNodePlan,
    LiveRoles,
    MariaDBPlan,
    NginxPlan,
    NodePlan,
    Plan,
    Port,
    PrometheusPlan,
    RateLimitPlan,
    RedisPlan,
    SentinelPlan,
    Topology,
    WorkerPlan,
)
from payctl.sizing import (
    ACTION_COST,
    CONSUMER_DB_POOL,
    KAFKA_PARTITIONS,
    MAX_CONNECTIONS_HEADROOM,
    RELAY_DB_POOL,
    Book,
    app_settings,
    cluster_capacity,
    disk_budget,
    mariadb_settings,
    mix_factor,
    nginx_settings,
    node_capacity,
    ports_of,
    prometheus_targets,
    redis_settings,
    reserve,
    size_node,
)

__all__ = [
    "ACTION_COST",
    "PORTS",
    "AppPlan",
    "Calibration",
    "Capacity",
    "ComponentPlan",
    "DiskItem",
    "DiskPlan",
    "Explained",
    "KafkaClusterPlan",
    "KafkaNodePlan",
    "LiveRoles",
    "MariaDBPlan",
    "NginxPlan",
    "NodePlan",
    "Plan",
    "Port",
    "PrometheusPlan",
    "RateLimitPlan",
    "RedisPlan",
    "SentinelPlan",
    "Topology",
    "WorkerPlan",
    "make_plan",
    "plan_as_dict",
]


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


def _check_requirements(inv: Inventory, phase: Phase, live: LiveRoles, book: Book) -> None:
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


def _topology(inv: Inventory, phase: Phase, active: tuple[Node, ...], live: LiveRoles, book: Book) -> Topology:
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


def _rate_limits(inv: Inventory, phase: Phase, book: Book) -> RateLimitPlan:
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
    book = Book()
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
        cpus, mem = size_node(inv, node, comps, book)
        sized[node.name] = (comps, cpus, mem)
        if "app" in comps:
            apps[node.name] = app_settings(inv, node, phase, cpus["app"], mem["app"], cal, bootstrap, book)
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
        reserve_cpus, reserve_mem = reserve(node)
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
        ports = ports_of(node, comps)
        disk, binlog_days, retention_h, prom_gb = disk_budget(node, comps, inv, brokers, rf, book)
        role = {
            "mariadb": "primary" if node.name == topo.mariadb_primary else "replica",
            "redis": "master" if node.name == topo.redis_master else "replica",
            "kafka": _kafka_roles(node.name, topo),
            "nginx": "lb",
        }
        components = tuple(ComponentPlan(c, role.get(c, ""), round(cpus[c], 2), mem[c], ports[c]) for c in comps)
        mariadb: MariaDBPlan | None = None
        if "mariadb" in comps and primary is not None:
            mariadb = mariadb_settings(
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
            redis = redis_settings(node, role["redis"], mem["redis"], redis_master.private_address, book)
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
        nginx = nginx_settings(node, cpus["nginx"], inv, phase, topo, book) if "nginx" in comps else None
        prometheus: PrometheusPlan | None = None
        if "prometheus" in comps:
            prometheus = PrometheusPlan(15, max(1, int(prom_gb * 0.9)), prometheus_targets(inv, sized))
            book.why(f"{node.name}.prometheus.retention_days", 15, "two weeks of history; the size bound may cut it")
            book.why(
                f"{node.name}.prometheus.retention_size_gb",
                prometheus.retention_size_gb,
                "90 % of its disk share, so the TSDB never outgrows it",
            )
        node_rps, node_bottleneck = node_capacity(comps, cpus, cal, mix_factor(phase))
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
    capacity = cluster_capacity(nodes, topo, phase, inv, cal, book)
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
            hint="lower overrides.cpus/memory_mb, use bigger nodes, or set overrides.allow_overcommit "
            "(payctl plan: --allow-overcommit) to go ahead anyway",
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


def plan_as_dict(plan: Plan) -> dict[str, object]:
    """The plan as JSON-able data (``payctl plan --json``)."""
    data = asdict(plan)
    for node, raw in zip(plan.nodes, data["nodes"], strict=True):
        raw["cpus_allocated"] = node.cpus_allocated
        raw["memory_allocated_mb"] = node.memory_allocated_mb
        if node.disk is not None:
            raw["disk"]["used_gb"] = node.disk.used_gb
    return data
