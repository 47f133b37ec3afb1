"""The last steps of ``payctl scale add-node``: converge every node on phase 5, then check the Sentinels agree.

By then the new node runs as a caught-up replica behind the LB. What the running node still lacks is what only a
whole-deployment apply gives it: its own Sentinel (the quorum needs three), the app's Sentinel addresses and both
Kafka brokers in ``app.env`` (so the app follows a Redis failover), Prometheus targets for the new nodes. That is
``payctl phase5 apply`` on every node; the steps before it already wrote what must not restart (the primary's
my.cnf, a Redis master's redis.conf whose settings did not change), so the apply restarts only the app programs
(one node at a time, out of the load balancer: nginx sends to the other meanwhile), Kafka for its new replication
settings, and reloads Prometheus.

Then Kafka (``payctl.kafkajoin``): the new controllers join the KRaft quorum and every topic gets the planned
replication factor and ``min.insync.replicas``. A Sentinel is useful only once it agrees with the others, so the
command ends by asking each one (``payctl.sentinels.wait_agreed``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from payctl import deploy, hosts, kafkajoin, rolling, sentinels
from payctl.failover import RedisNode
from payctl.inventory import Inventory
from payctl.plan import PORTS, Plan
from payctl.replication import NodeIO

PHASE = 5
SENTINEL_AGREE_TIMEOUT_S = 90.0


class StepHooks(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress."""


class AutoConfirm:
    """Deploy hooks for an apply the user already confirmed (as part of ``scale add-node``): progress passes through,
    the preview is accepted."""

    def __init__(self, hooks: StepHooks) -> None:
        self.hooks = hooks

    def step(self, node: str | None, step: str) -> None:
        self.hooks.step(node, step)

    def confirm(self, preview: deploy.Preview) -> bool:
        return True


@dataclass(frozen=True)
class CompleteRequest:
    inventory: Inventory
    inventory_path: Path
    home: Path
    command: str
    plan: Plan  # the phase-5 plan add-node made (live roles)
    secrets: Mapping[str, str]  # revealed: the Sentinel password is needed to ask the Sentinels
    io: Callable[[hosts.Connected, str], NodeIO]  # how to run commands on a connected node (scale.SshIO)


def steps(plan: Plan, node: str) -> list[tuple[str, str, str, str]]:
    """The plan's lines for these steps: (key, node, what, undo)."""
    topo = plan.topology
    others = [n.name for n in plan.active_nodes if n.name != node and n.app is not None]
    running = ", ".join(others) or topo.mariadb_primary
    out = [("converge", running,
            f"phase {PHASE} apply on every node: {running} gains "
            + ("its Sentinel, " if topo.sentinels else "")
            + f"app.env with {'the Sentinels and ' if topo.sentinels else ''}both Kafka brokers (its app restarts "
            f"out of the load balancer while nginx sends to {node}), Prometheus targets for the new nodes",
            f"none: {node} stays added; run the command again (or phase{PHASE} apply) to complete it")]  # fmt: skip
    if len(topo.kafka_brokers) > 1:
        k = plan.kafka
        joining = [c for c in topo.kafka_controllers[1:]]
        out.append(("kafka", topo.kafka_controllers[0],
                    (f"Kafka: {' and '.join(joining)} join the KRaft quorum (kafka-metadata-quorum add-controller); "
                     if joining else "Kafka: ")
                    + f"every topic (__consumer_offsets included) reassigned to RF {k.replication_factor} on "
                    f"{', '.join(topo.kafka_brokers)}, then the topics' min.insync.replicas {k.min_insync_replicas}",
                    "none: the extra replicas and voters stay (a re-run finds nothing to move)"))  # fmt: skip
    if topo.sentinels:
        n = len(topo.sentinels)
        out.append(("sentinels", ", ".join(topo.sentinels),
                    f"wait until the {n} Sentinels name the same Redis master (planned: {topo.redis_master}; "
                    "a failover the converge causes may move it), quorum "
                    f"{topo.sentinel_quorum}, each seeing the other {n - 1}",
                    "none (a check)"))  # fmt: skip
    return out


@dataclass
class Completed:
    sentinels: list[str]  # what each Sentinel said once they agreed
    rolled: list[rolling.Restarted]  # the app restarts of the apply (one node at a time, out of the LB)


def complete(req: CompleteRequest, hooks: StepHooks) -> Completed:
    """Phase-5 apply on every node, then wait for the Sentinels to agree."""
    hooks.step(None, f"converge: phase {PHASE} apply on every node")
    applied = deploy.apply(
        deploy.ApplyRequest(req.inventory, req.inventory_path, PHASE, req.home, req.command), AutoConfirm(hooks)
    )
    kafka(req, hooks)
    return Completed(check_sentinels(req, hooks), applied.rolled)


def kafka(req: CompleteRequest, hooks: StepHooks) -> list[kafkajoin.Topic]:
    """New controllers into the quorum, then RF and min ISR of every topic; run from the first controller's node."""
    plan, topo, inv = req.plan, req.plan.topology, req.inventory
    if len(topo.kafka_brokers) < 2:
        return []
    first = topo.kafka_controllers[0]
    names = list(dict.fromkeys([*topo.kafka_controllers, *topo.kafka_brokers]))
    with hosts.connect(inv, req.home, nodes=names) as conn:

        def host(n: str) -> kafkajoin.KafkaHost:
            prefix = inv.node_prefix(n)
            return kafkajoin.KafkaHost(n, req.io(conn, n), f"{prefix}/kafka/lib", f"{prefix}/payctl/tmp")

        def props(n: str) -> str:
            k = plan.node(n).kafka
            assert k is not None
            return f"{inv.node_prefix(n)}/kafka/{'server' if 'broker' in k.process_roles else 'controller'}.properties"

        def node_id(n: str) -> int:
            k = plan.node(n).kafka
            assert k is not None
            return k.node_id

        def step(s: str) -> None:
            hooks.step(first, f"kafka: {s}")

        controllers = f"{plan.node(first).private_address}:{PORTS['kafka_controller']}"
        new = [(host(c), node_id(c), props(c)) for c in topo.kafka_controllers[1:]]
        kafkajoin.add_controllers(host(first), new, controllers, step=step)
        return kafkajoin.raise_replication(host(first), plan.kafka.bootstrap_servers,
                                           [node_id(b) for b in topo.kafka_brokers], plan.kafka.replication_factor,
                                           plan.kafka.min_insync_replicas, step=step)  # fmt: skip


def check_sentinels(req: CompleteRequest, hooks: StepHooks) -> list[str]:
    topo = req.plan.topology
    if not topo.sentinels:
        return []
    # Any Redis node may be the master by now: restarting the master in the converge (a setting changed) lets the
    # Sentinels fail it over, which is what they are for. They must agree, on a node of this deployment.
    masters = [
        f"{req.plan.node(r).private_address}:{PORTS['redis']}" for r in (topo.redis_master, *topo.redis_replicas)
    ]
    name = next(n.sentinel.master_name for n in req.plan.active_nodes if n.sentinel is not None)
    hooks.step(None, f"Sentinels on {', '.join(topo.sentinels)}: same master, quorum {topo.sentinel_quorum}")
    inv = req.inventory
    with hosts.connect(inv, req.home, nodes=list(topo.sentinels)) as conn:
        nodes = [RedisNode(s, req.plan.node(s).private_address, PORTS["sentinel"],
                           f"{inv.node_prefix(s)}/payctl/tmp", req.io(conn, s)) for s in topo.sentinels]  # fmt: skip
        views = sentinels.wait_agreed(nodes, "sentinel", req.secrets["redis_sentinel"], name,
                                      masters, topo.sentinel_quorum,
                                      SENTINEL_AGREE_TIMEOUT_S)  # fmt: skip
    return [v.describe() for v in views]
