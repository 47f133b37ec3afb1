from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest

from payctl.errors import ConfigError
from payctl.inventory import Inventory, load_inventory, parse_inventory
from payctl.phase import PHASES, Phase, load_phase
from payctl.plan import Calibration, LiveRoles, Plan, make_plan, plan_as_dict

BUNDLED = ["ktcloud-1node", "ktcloud-2node", "lab-1node", "lab-2node"]


def _inv(name: str, **overrides: Any) -> Inventory:
    data = load_inventory(name).model_dump(exclude_none=True)
    data.update(overrides)
    return parse_inventory(data)


def _cases() -> list[tuple[str, int]]:
    return [(inv, n) for inv in BUNDLED for n in PHASES if n < 5 or "2node" in inv]


@pytest.mark.parametrize(("inv", "n"), _cases())
def test_every_bundled_plan_fits_its_nodes(inv: str, n: int) -> None:
    plan = make_plan(load_inventory(inv), load_phase(n))
    assert not [w for w in plan.warnings if "over-commit" in w]
    for node in plan.active_nodes:
        assert node.cpus_allocated <= node.cpus - node.reserve_cpus + 1e-9, node.name
        assert node.memory_allocated_mb <= node.memory_mb - node.reserve_memory_mb, node.name
        assert node.disk is not None and node.disk.used_gb <= node.disk.disk_gb + 0.05, node.name
        for c in node.components:
            assert c.cpus > 0 and c.memory_mb > 0
            # Every limit is explained.
            assert plan.why(f"{node.name}.{c.name}.cpus") and plan.why(f"{node.name}.{c.name}.memory_mb")
        if node.mariadb:
            assert 128 <= node.mariadb.innodb_buffer_pool_size_mb < node.component("mariadb").memory_mb  # type: ignore[union-attr]
        if node.redis:
            assert node.redis.maxmemory_mb < node.component("redis").memory_mb  # type: ignore[union-attr]
            assert node.redis.maxmemory_policy == "noeviction"
        if node.kafka:
            assert node.kafka.heap_mb < node.component("kafka").memory_mb  # type: ignore[union-attr]
    json.dumps(plan_as_dict(plan))  # JSON-able


def test_the_original_hand_written_table_is_rejected() -> None:
    """app 2 + consumer 1.5 + MariaDB 0.5 + Redis 0.25 + Kafka 0.25 = 4.5 CPUs on a 4-CPU node."""
    table = {"app": 2, "consumer": 1.5, "mariadb": 0.5, "redis": 0.25, "kafka": 0.25}
    inv = _inv("ktcloud-1node", overrides={"cpus": table})
    with pytest.raises(ConfigError) as info:
        make_plan(inv, load_phase(2))
    assert info.value.exit_code == 2
    assert info.value.message == "ktcloud-pay: the capacity plan for phase 2 does not fit"
    assert info.value.problems == [
        "node1: CPU limits sum to 4.6 but the node has 4 CPUs (0.25 reserved for the OS): app 2, relay 0.05, "
        "consumer 1.5, mariadb 0.5, redis 0.25, kafka 0.25, nginx 0.05"
    ]
    # Explicitly allowed, it is a warning and the plan keeps the table's numbers.
    plan = make_plan(inv, load_phase(2), allow_overcommit=True)
    assert plan.warnings[0].startswith("over-commit allowed: node1: CPU limits sum to 4.6")
    assert plan.node("node1").component("app").cpus == 2  # type: ignore[union-attr]
    assert plan.why("node1.app.cpus") == "overrides"


def test_a_table_that_fits_is_accepted_and_the_rest_shares_what_is_left() -> None:
    inv = _inv("ktcloud-1node", overrides={"cpus": {"app": 1.5, "mariadb": 0.75}})
    node = make_plan(inv, load_phase(2)).node("node1")
    assert node.component("app").cpus == 1.5  # type: ignore[union-attr]
    assert node.cpus_allocated <= 3.75
    assert node.app is not None and node.app.workers == 2


def test_memory_overcommit_is_caught() -> None:
    inv = _inv("lab-1node", overrides={"memory_mb": {"mariadb": 4096}, "average_rps": 20})
    with pytest.raises(ConfigError) as info:
        make_plan(inv, load_phase(1))
    assert info.value.problems[0].startswith("node1: memory limits sum to ")
    assert "but the node has 3072 MB (304 MB reserved for the OS)" in info.value.problems[0]


def test_disk_that_cannot_hold_a_day_of_binlog_is_caught() -> None:
    nodes = [n | {"disk_gb": 10} for n in load_inventory("ktcloud-1node").model_dump(exclude_none=True)["nodes"]]
    with pytest.raises(ConfigError) as info:
        make_plan(_inv("ktcloud-1node", nodes=nodes), load_phase(1))
    assert any(p.startswith("node1: disk: 10 GB leaves") for p in info.value.problems)


def test_max_connections_covers_every_pool_of_every_node() -> None:
    plan = make_plan(load_inventory("ktcloud-2node"), load_phase(5))
    pools = 0
    for node in plan.active_nodes:
        if node.app:
            pools += node.app.workers * node.app.db_pool_per_worker
        for worker in (node.relay, node.consumer):
            if worker:
                pools += worker.processes * worker.db_pool
    primary, replica = plan.node("node1").mariadb, plan.node("node2").mariadb
    assert primary is not None and replica is not None
    assert primary.max_connections >= pools + 20
    assert replica.max_connections == primary.max_connections  # a replica may be promoted
    assert (primary.role, primary.read_only, replica.role, replica.read_only) == ("primary", False, "replica", True)
    assert primary.server_id != replica.server_id


def test_phases_switch_components_on() -> None:
    inv = load_inventory("ktcloud-1node")
    names = {n: [c.name for c in make_plan(inv, load_phase(n)).node("node1").components] for n in (1, 2, 4)}
    assert names[1] == ["app", "relay", "mariadb", "redis", "kafka", "nginx"]
    assert names[2] == ["app", "relay", "consumer", "mariadb", "redis", "kafka", "nginx"]
    assert names[4] == [
        "app", "relay", "consumer", "mariadb", "redis", "kafka", "nginx", "prometheus", "grafana", "exporters"
    ]  # fmt: skip


def test_two_node_inventory_before_phase5_deploys_node1_only() -> None:
    plan = make_plan(load_inventory("ktcloud-2node"), load_phase(3))
    assert [n.name for n in plan.active_nodes] == ["node1"]
    assert plan.node("node2").components == ()
    assert "node2: not deployed before phase 5 (joins with scale add-node)" in plan.notes
    assert (plan.kafka.replication_factor, plan.kafka.min_insync_replicas) == (1, 1)
    assert plan.topology.lb_upstreams == ("node1",)


def test_phase5_topology_with_witness() -> None:
    plan = make_plan(load_inventory("ktcloud-2node"), load_phase(5))
    t = plan.topology
    assert (t.mariadb_primary, t.mariadb_replicas, t.redis_master, t.redis_replicas) == (
        "node1", ("node2",), "node1", ("node2",)
    )  # fmt: skip
    assert t.sentinels == ("node1", "node2", "witness") and t.sentinel_quorum == 2
    assert t.kafka_brokers == ("node1", "node2") and t.kafka_controllers == ("node1", "node2", "witness")
    assert (plan.kafka.replication_factor, plan.kafka.min_insync_replicas, plan.kafka.partitions) == (2, 2, 12)
    assert plan.kafka.controller_quorum_bootstrap == "198.51.100.11:9093,198.51.100.12:9093,198.51.100.13:9093"
    witness = plan.node("witness")
    assert [(c.name, c.role) for c in witness.components] == [
        ("sentinel", ""), ("kafka", "controller"), ("exporters", "")
    ]  # fmt: skip
    assert [p.port for c in witness.components for p in c.ports] == [26379, 9093, 9100, 9404]  # 9404: JMX agent
    assert witness.kafka is not None and witness.kafka.retention_hours is None
    node2 = plan.node("node2")
    assert node2.redis is not None and node2.redis.replicaof == "198.51.100.11"
    assert node2.nginx is None
    lb = plan.node("node1").nginx
    assert lb is not None and lb.upstreams == ("198.51.100.11:8080", "198.51.100.12:8080")
    assert lb.listen_address == "203.0.113.10"
    nginx = plan.node("node1").component("nginx")
    assert nginx is not None and [(p.port, p.address, p.public) for p in nginx.ports] == [
        (80, "203.0.113.10", True), (443, "203.0.113.10", True), (8081, "127.0.0.1", False)
    ]  # fmt: skip


def test_phase5_without_witness_warns_and_deploys_no_sentinel() -> None:
    data = load_inventory("ktcloud-2node").model_dump(exclude_none=True)
    data["nodes"] = data["nodes"][:2]
    plan = make_plan(parse_inventory(data), load_phase(5))
    assert plan.topology.sentinels == () and plan.topology.kafka_controllers == ("node1",)
    assert all(n.sentinel is None for n in plan.nodes)
    assert plan.warnings == (
        "no witness: payctl does not deploy a two-Sentinel quorum that cannot be safe; Redis failover is manual "
        "(payctl failover redis)",
        "no witness: one Kafka controller (node1); if that node is lost the cluster has no quorum",
    )


def test_phase5_needs_node2() -> None:
    with pytest.raises(ConfigError) as info:
        make_plan(load_inventory("ktcloud-1node"), load_phase(5))
    assert info.value.message == "ktcloud-pay: the inventory cannot carry phase 5"
    assert info.value.problems == [
        "phase 5 needs a node named 'node2' in the inventory (nodes: node1)",
        "phase 5 needs 2 nodes with the role 'app', the inventory has 1",
    ]


def test_monitoring_phase_needs_a_monitoring_node() -> None:
    data = load_inventory("ktcloud-1node").model_dump(exclude_none=True)
    data["nodes"][0]["roles"] = [r for r in data["nodes"][0]["roles"] if r != "monitoring"]
    inv = parse_inventory(data)
    make_plan(inv, load_phase(3))
    with pytest.raises(ConfigError) as info:
        make_plan(inv, load_phase(4))
    assert info.value.problems == ["phase 4 runs monitoring: some node needs the role 'monitoring'"]


def test_live_roles_win_over_the_inventory() -> None:
    live = LiveRoles(mariadb_primary="node2", redis_master="node2")
    plan = make_plan(load_inventory("ktcloud-2node"), load_phase(5), live_roles=live)
    n1, n2 = plan.node("node1"), plan.node("node2")
    assert n1.mariadb is not None and n2.mariadb is not None and n1.redis is not None and n2.redis is not None
    assert (n2.mariadb.role, n2.mariadb.read_only, n1.mariadb.role, n1.mariadb.read_only) == (
        "primary", False, "replica", True
    )  # fmt: skip
    assert n1.mariadb.primary_address == "198.51.100.12"
    assert (n2.redis.role, n2.redis.replicaof, n1.redis.replicaof) == ("master", None, "198.51.100.12")
    assert n1.sentinel is not None and n1.sentinel.master_address == "198.51.100.12"
    assert plan.why("topology.mariadb_primary") == "live role from the hosts"
    with pytest.raises(ConfigError) as info:
        make_plan(load_inventory("ktcloud-2node"), load_phase(5), live_roles=LiveRoles(mariadb_primary="witness"))
    assert info.value.problems == [
        "live roles: mariadb_primary is 'witness', which is not a 'mariadb' node of the inventory"
    ]


def test_app_settings_and_env() -> None:
    plan = make_plan(load_inventory("ktcloud-1node"), load_phase(3))
    app = plan.node("node1").app
    assert app is not None
    env = dict(app.env)
    assert env["PAYAPP_WORKERS"] == str(app.workers)
    assert env["PAYAPP_DB_POOL_SIZE"] == str(app.db_pool_per_worker)
    assert (env["PAYAPP_RATE_LIMIT_AUTHORIZE"], env["PAYAPP_RATE_LIMIT_CAPTURE"], env["PAYAPP_RATE_LIMIT_REFUND"]) == (
        "30000", "30000", "15000"
    )  # fmt: skip
    assert env["PAYAPP_HOST"] == "198.51.100.11" and env["PAYAPP_PORT"] == "8080"
    assert env["PAYAPP_KAFKA_BOOTSTRAP"] == "198.51.100.11:9092"
    assert app.db_pool_timeout_ms == 900  # phase 3: pool timeouts
    assert make_plan(load_inventory("ktcloud-1node"), load_phase(2)).node("node1").app.db_pool_timeout_ms is None  # type: ignore[union-attr]
    assert not any("SECRET" in k or "URL" in k for k in env)  # secrets come from the renderer's store


def test_overrides_for_workers_and_pools() -> None:
    inv = _inv("ktcloud-1node", overrides={"app_workers": 3, "db_pool_per_worker": 7, "kafka_partitions": 24})
    plan = make_plan(inv, load_phase(2))
    app = plan.node("node1").app
    assert app is not None and (app.workers, app.db_pool_per_worker) == (3, 7)
    assert plan.kafka.partitions == 24
    assert plan.node("node1").mariadb.max_connections == 3 * 7 + 2 + 4 + 20  # type: ignore[union-attr]


def _with_gate(phase: Phase, **gate: Any) -> Phase:
    return phase.model_copy(update={"gate": phase.gate.model_copy(update=gate)})


def test_rate_limit_warning_when_the_gate_overruns_one_merchant() -> None:
    inv = load_inventory("ktcloud-2node")
    plan = make_plan(inv, load_phase(5))
    assert not [w for w in plan.warnings if w.startswith("rate limit")]
    assert dict(plan.rate_limits.per_merchant_rps)["authorize"] == 2.5  # 1000 rps x 0.5 / 200 merchants
    assert plan.rate_limits.scope == "cluster"
    plan = make_plan(inv, _with_gate(load_phase(5), merchants=1, rps=1200))
    assert [w for w in plan.warnings if w.startswith("rate limit")] == [
        "rate limit: the phase 5 gate sends one merchant 600 authorize/s but the cluster-wide limit allows 500/s "
        "(30000/min): expect 429s; spread the load over >= 2 merchants or raise the limit"
    ]


def test_predicted_capacity_uses_the_calibration() -> None:
    inv, phase = load_inventory("ktcloud-1node"), load_phase(2)
    base = make_plan(inv, phase)
    node = base.node("node1")
    app = node.component("app")
    assert app is not None
    mix = sum(w * c for w, c in zip(phase.gate.mix.values(), (1, 1, 1, 0.8, 0.4), strict=True))
    assert node.predicted_rps <= int(app.cpus * 1000 / (0.35 * mix) * 0.7)
    assert base.capacity.total_rps <= sum(n for _, n, _ in base.capacity.per_node)
    slow = make_plan(inv, phase, calibration=Calibration(app_ms=3.5, source="test"))
    assert slow.node("node1").predicted_rps == pytest.approx(node.predicted_rps / 10, abs=2)
    assert slow.capacity.bottleneck == "app tier" and slow.capacity.calibration == "test"
    assert slow.warnings == (
        f"predicted capacity {slow.capacity.total_rps} rps (bottleneck: app tier) is below the phase 2 gate of 400 rps",
    )


def test_plan_is_deterministic_and_frozen() -> None:
    inv, phase = load_inventory("lab-2node"), load_phase(5)
    a, b = make_plan(inv, phase), make_plan(inv, phase)
    assert a == b and plan_as_dict(a) == plan_as_dict(b)
    with pytest.raises(AttributeError):
        a.phase = 4  # type: ignore[misc]
    assert isinstance(a, Plan)


def test_calibration_from_a_measured_knee() -> None:
    # The ENVIRONMENT.md baseline: one app process on one core saturated at ~2877 authorize/s.
    cal = Calibration.from_measured(2877, 1.0, source="baseline")
    assert cal.app_ms == pytest.approx(0.3476, abs=1e-4)
    plan = make_plan(load_inventory("ktcloud-1node"), load_phase(1), calibration=cal)
    node = plan.node("node1")
    assert node.predicted_bottleneck in ("app", "relay")  # the two are within 1 % of each other here
    assert plan.capacity.per_node == (("node1", node.predicted_rps, node.predicted_bottleneck),)
    assert plan.capacity.calibration == "baseline"
    with pytest.raises(ValueError):
        Calibration.from_measured(0, 1.0)


@pytest.mark.parametrize(("inv", "n"), [("ktcloud-2node", 5), ("lab-1node", 4)])
def test_every_derived_number_is_explained(inv: str, n: int) -> None:
    plan = make_plan(load_inventory(inv), load_phase(n))
    missing = []
    for node in plan.active_nodes:
        for section in ("app", "relay", "consumer", "mariadb", "redis", "sentinel", "kafka", "nginx", "prometheus"):
            settings = getattr(node, section)
            if settings is None:
                continue
            for f in fields(settings):
                value = getattr(settings, f.name)
                if f.name in ("port", "metrics_port") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float) and not plan.why(f"{node.name}.{section}.{f.name}"):
                    missing.append(f"{node.name}.{section}.{f.name}")
    assert missing == []
