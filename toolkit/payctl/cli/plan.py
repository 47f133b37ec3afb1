"""`payctl plan -i INV [--phase N] [--json] [--explain] [--allow-overcommit]`: the capacity plan, computed by
``payctl.plan`` and printed here (rich tables, or JSON only on stdout)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import NodePlan, Plan, make_plan, plan_as_dict

_EXAMPLES = """

Examples:

  payctl plan -i inventories/ktcloud-1node.yml --phase 4

  payctl plan -i lab-2node --phase 5 --explain

  payctl plan -i ktcloud-2node --phase 5 --json | jq .capacity
"""


def _settings(node: NodePlan) -> dict[str, str]:
    out: dict[str, str] = {}
    if node.app:
        out["app"] = f"workers {node.app.workers}, pool {node.app.db_pool_per_worker}/worker" + (
            f", pool timeout {node.app.db_pool_timeout_ms} ms" if node.app.db_pool_timeout_ms else ""
        )
    if node.relay:
        out["relay"] = f"{node.relay.processes} process, pool {node.relay.db_pool}"
    if node.consumer:
        out["consumer"] = f"{node.consumer.processes} process(es), pool {node.consumer.db_pool}"
    if node.mariadb:
        m = node.mariadb
        out["mariadb"] = (
            f"server_id {m.server_id}, buffer pool {m.innodb_buffer_pool_size_mb} MB, max_connections "
            f"{m.max_connections}, binlog {m.binlog_expire_days} d" + (", read_only" if m.read_only else "")
        )
    if node.redis:
        r = node.redis
        out["redis"] = f"maxmemory {r.maxmemory_mb} MB {r.maxmemory_policy}" + (
            f", replicaof {r.replicaof}" if r.replicaof else ""
        )
    if node.sentinel:
        out["sentinel"] = f"master {node.sentinel.master_address}, quorum {node.sentinel.quorum}"
    if node.kafka:
        out["kafka"] = f"node.id {node.kafka.node_id}, heap {node.kafka.heap_mb} MB" + (
            f", retention {node.kafka.retention_hours} h" if node.kafka.retention_hours else ""
        )
    if node.nginx:
        n = node.nginx
        out["nginx"] = (
            f"{n.worker_processes} worker(s) x {n.worker_connections} connections, upstreams {', '.join(n.upstreams)}"
        )
    if node.prometheus:
        p = node.prometheus
        out["prometheus"] = f"retention {p.retention_days} d / {p.retention_size_gb} GB, {len(p.targets)} targets"
    return out


def _print(plan: Plan, console: Console, explain: bool) -> None:
    console.print(
        f"[bold]capacity plan[/]: deployment [bold]{plan.deployment}[/], phase {plan.phase}, runtime {plan.runtime}"
    )
    for node in plan.nodes:
        if not node.active:
            console.print(f"\n[bold]{node.name}[/] ({node.private_address}): not deployed in phase {plan.phase}")
            continue
        table = Table(
            title=f"{node.name} ({node.private_address}) {node.cpus:g} CPUs, {node.memory_mb} MB; OS reserve "
            f"{node.reserve_cpus:g} CPUs, {node.reserve_memory_mb} MB",
            title_justify="left",
        )
        for col, justify in (("component", "left"), ("role", "left"), ("CPUs", "right"), ("memory MB", "right"),
                             ("ports", "left"), ("settings", "left")):  # fmt: skip
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        settings = _settings(node)
        for c in node.components:
            ports = ", ".join(f"{p.port}" for p in c.ports)
            table.add_row(c.name, c.role, f"{c.cpus:g}", str(c.memory_mb), ports, settings.get(c.name, ""))
        table.add_row("[bold]total[/]", "", f"{node.cpus_allocated:g}", str(node.memory_allocated_mb), "", "")
        console.print()
        console.print(table)
        if node.disk:
            items = ", ".join(f"{i.name} {i.gb:g}" for i in node.disk.items)
            console.print(f"  disk {node.disk.used_gb:g} of {node.disk.disk_gb:g} GB: {items}")
    t = plan.topology
    console.print()
    console.print(
        f"[bold]roles[/]: MariaDB primary {t.mariadb_primary}"
        + (f", replicas {', '.join(t.mariadb_replicas)}" if t.mariadb_replicas else "")
        + f"; Redis master {t.redis_master}"
        + (f", replicas {', '.join(t.redis_replicas)}" if t.redis_replicas else "")
        + (f"; Sentinels {', '.join(t.sentinels)} (quorum {t.sentinel_quorum})" if t.sentinels else "")
        + f"; Kafka brokers {', '.join(t.kafka_brokers)}, controllers {', '.join(t.kafka_controllers)}"
        + f"; LB {t.lb} -> {', '.join(t.lb_upstreams)}"
    )
    k = plan.kafka
    console.print(
        f"[bold]kafka[/]: {k.partitions} partitions, replication factor {k.replication_factor}, "
        f"min.insync.replicas {k.min_insync_replicas}"
    )
    r = plan.rate_limits
    console.print(
        f"[bold]rate limits[/] (per merchant per minute, whole cluster): authorize {r.authorize}, capture "
        f"{r.capture}, refund {r.refund}"
    )
    cap = plan.capacity
    per_node = ", ".join(f"{name} {rps}" for name, rps, _ in cap.per_node)
    console.print(
        f"[bold]predicted capacity[/]: {cap.total_rps} rps (bottleneck: {cap.bottleneck}; app tier per node: "
        f"{per_node}); gate {cap.gate_rps} rps, target {cap.target_rps} rps"
    )
    for note in plan.notes:
        console.print(f"[dim]note:[/] {note}")
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    if explain:
        table = Table(title="why", title_justify="left")
        table.add_column("key")
        table.add_column("value", justify="right")
        table.add_column("why")
        for e in plan.explanations:
            table.add_row(e.key, e.value, e.why)
        console.print()
        console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("plan", help="Compute the capacity plan of an inventory at a phase." + _EXAMPLES)
    def plan(
        inventory: str = typer.Option(
            ..., "-i", "--inventory", help="Inventory file, or a bundled name (ktcloud-1node, lab-2node ...)."
        ),
        phase: int = typer.Option(1, "--phase", min=1, max=5, help="Phase 1-5 (cumulative)."),
        as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
        explain: bool = typer.Option(False, "--explain", help="Show why each number is what it is."),
        allow_overcommit: bool = typer.Option(
            False, "--allow-overcommit", help="Over-commit of CPU/memory/disk becomes a warning instead of an error."
        ),
    ) -> None:
        inv = load_inventory(inventory)
        result = make_plan(inv, load_phase(phase), allow_overcommit=allow_overcommit)
        if as_json:
            typer.echo(json.dumps(plan_as_dict(result), indent=2))
            return
        _print(result, Console(highlight=False, width=160), explain)
