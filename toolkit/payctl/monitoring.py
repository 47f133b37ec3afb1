"""What monitoring answers, as data: the metrics each target exports, the per-node figures and the run series.

One place names the PromQL that ``payctl status`` (live figures per node), ``payctl verify`` (server series over the
run window) and the tests read; the dashboard and alert templates use the recording rules of
``templates/prometheus/payctl.rules.yml.j2`` (``payctl:*``), which these queries reuse.

In the lab every host shares this machine's /proc, so the node exporter's CPU and memory are the whole machine's: each
lab host runs a loop that writes its own cgroup's figures for the node exporter's textfile collector (``LAB_METRICS``,
templates/exporters/lab-cgroup-metrics.py), and the lab's recording rules read those. Where Prometheus has no such
figure (a deployment from before the loop), ``with_lab_cgroups`` fills it from the host's cgroup read locally
(``payctl.labmetrics``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from payctl.inventory import Inventory, Node
from payctl.prom import PromClient, ScrapeTarget
from payctl.report import ServerSeries
from payctl.verification import Sampler

#: Metric -> the scrape job that exports it. The structural tests check that every dashboard/alert expression uses
#: only these (or recording rules), and the lab test that each one exists in a live Prometheus.
METRICS: Mapping[str, str] = MappingProxyType({
    "payapp_http_requests_total": "payapp",
    "payapp_http_request_duration_seconds_bucket": "payapp",
    "payapp_ratelimit_rejected_total": "payapp",
    "payapp_ratelimit_fallback_total": "payapp",
    "payapp_db_pool_in_use": "payapp",
    "payapp_db_pool_waiting": "payapp",
    "payapp_db_pool_size": "payapp",
    "payapp_relay_published_total": "relay",
    "payapp_relay_publish_errors_total": "relay",
    "payapp_outbox_backlog": "relay",
    "payapp_outbox_oldest_unpublished_seconds": "relay",
    "payapp_consumer_lag": "relay",
    "payapp_consumer_lag_total": "relay",
    "payapp_dlq_open": "relay",
    "payapp_reconcile_last_balanced": "relay",
    "payapp_reconcile_last_run_timestamp_seconds": "relay",
    "payapp_consumer_events_total": "consumer",
    "node_cpu_seconds_total": "node",
    "node_memory_MemTotal_bytes": "node",
    "node_memory_MemAvailable_bytes": "node",
    "node_filesystem_avail_bytes": "node",
    "node_filesystem_size_bytes": "node",
    "mysql_up": "mysqld",
    "mysql_global_status_rpl_semi_sync_master_status": "mysqld",
    "mysql_global_variables_rpl_semi_sync_master_enabled": "mysqld",
    "redis_up": "redis",
    "nginx_up": "nginx",
    # the brokers' JMX exporter agent (native runtime: sizing.broker_metrics; templates/kafka/jmx-exporter.yml.j2)
    "kafka_server_under_replicated_partitions": "kafka",
    "kafka_server_isr_shrinks_total": "kafka",
    "kafka_server_isr_expands_total": "kafka",
    "kafka_server_messages_in_total": "kafka",
    "kafka_network_requests_total": "kafka",
    "kafka_log_size_bytes": "kafka",
    "kafka_controller_active": "kafka",
    "up": "",
})  # fmt: skip

#: Lab hosts only: the host's own cgroup figures, served by its node exporter's textfile collector.
LAB_METRICS: Mapping[str, str] = MappingProxyType({
    "payctl_lab_node_cpu_seconds_total": "node",
    "payctl_lab_node_cpu_limit_cores": "node",
    "payctl_lab_node_memory_usage_bytes": "node",
    "payctl_lab_node_memory_limit_bytes": "node",
})  # fmt: skip

#: Metrics that exist only on some deployments (a replica, a failed reconciliation run, a published settlement).
OPTIONAL: frozenset[str] = frozenset({
    "mysql_slave_status_seconds_behind_master", "mysql_slave_status_slave_io_running",
    "mysql_slave_status_slave_sql_running", "payapp_settlement_events_total", "payapp_reconcile_last_balanced",
    "payapp_reconcile_last_run_timestamp_seconds",
})  # fmt: skip

#: Per node, one instant query each (``payctl status``). Keys are the JSON keys.
FIGURES: Mapping[str, str] = MappingProxyType({
    "cpu": "payctl:node_cpu_ratio:1m * 100",
    "memory": "payctl:node_memory_used_bytes / 1e6",
    "rps": "payctl:requests:rate1m",
    "p95_ms": "payctl:request_p95_seconds:1m * 1000",
    "error_percent": "payctl:errors:rate1m / clamp_min(payctl:requests:rate1m, 1e-9) * 100",
    "consumer_lag": "max by (node) (payapp_consumer_lag_total)",
    "outbox_backlog": "max by (node) (payapp_outbox_backlog)",
    "replica_lag_s": "max by (node) (mysql_slave_status_seconds_behind_master)",
    "semi_sync": "max by (node) (mysql_global_status_rpl_semi_sync_master_status)",
    "disk_free_percent": "payctl:node_disk_free_ratio * 100",
    "kafka_under_replicated": "max by (node) (kafka_server_under_replicated_partitions)",
})  # fmt: skip

UNITS: Mapping[str, str] = MappingProxyType({
    "cpu": "%", "memory": "MB", "rps": "/s", "p95_ms": "ms", "error_percent": "%", "consumer_lag": "",
    "outbox_backlog": "", "replica_lag_s": "s", "semi_sync": "", "disk_free_percent": "%", "kafka_under_replicated": "",
})  # fmt: skip

#: The run series of ``payctl verify`` (ServerSeries fields); raw metrics, not 1m rules, so a short run has points.
#: A lab host's own cgroup series win over the node exporter's whole-machine ones (``or`` keeps the right-hand side
#: only for nodes the left-hand side lacks, i.e. real VMs).
RUN_SERIES: Mapping[str, str] = MappingProxyType({
    # % of one core, as the report (and the lab's cgroup sampler) counts it: 400 is a busy 4-core node
    "cpu_percent": "sum by (node) (rate(payctl_lab_node_cpu_seconds_total[30s])) * 100"
                   ' or sum by (node) (rate(node_cpu_seconds_total{mode!="idle"}[30s])) * 100',
    "memory_mb": "sum by (node) (payctl_lab_node_memory_usage_bytes) / 1e6"
                 " or sum by (node) (node_memory_MemTotal_bytes - node_memory_MemAvailable_bytes) / 1e6",
    "consumer_lag": "max(payapp_consumer_lag_total)",
})  # fmt: skip


@dataclass(frozen=True)
class LiveFigures:
    """What ``payctl status`` adds: per node figures and the scrape targets with their health."""

    nodes: Mapping[str, Mapping[str, float]]
    targets: tuple[ScrapeTarget, ...]
    source: str
    notes: tuple[str, ...] = ()

    def node(self, name: str) -> Mapping[str, float]:
        return self.nodes.get(name, {})

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "nodes": {n: dict(v) for n, v in self.nodes.items()},
                "targets": [t.as_dict() for t in self.targets], "notes": list(self.notes)}  # fmt: skip


def live_figures(client: PromClient, source: str) -> LiveFigures:
    """Every figure per node (a node without a value for a figure simply lacks the key) and every target."""
    nodes: dict[str, dict[str, float]] = {}
    for key, expr in FIGURES.items():
        for s in client.query(expr):
            node = s.labels.get("node", "")
            if node and s.value == s.value:  # NaN (no requests yet) is no figure
                nodes.setdefault(node, {})[key] = round(s.value, 3)
    return LiveFigures(nodes, tuple(client.targets()), source)


LAB_NOTE = ("lab: cpu (% of the host's CPU quota) and memory (MB) from each host's cgroup, through its node "
            "exporter's textfile collector (the node exporter's own figures are the whole machine's)")


def lab_cgroups_missing(figures: LiveFigures, nodes: Sequence[str]) -> list[str]:
    """Lab nodes for which Prometheus has no cpu or memory figure (their cgroup loop has not reported yet)."""
    return [n for n in nodes if not {"cpu", "memory"} <= set(figures.node(n))]


def with_lab_cgroups(figures: LiveFigures, cgroup: Mapping[str, Mapping[str, float]]) -> LiveFigures:
    """Lab hosts share /proc: fill the cpu/memory figures Prometheus lacks from the host's cgroup read locally."""
    nodes = {n: dict(v) for n, v in figures.nodes.items()}
    filled = []
    for node, values in cgroup.items():
        mine = nodes.setdefault(node, {})
        for key, value in values.items():
            if key not in mine:
                mine[key] = value
                filled.append(f"{node}.{key}")
    notes = [LAB_NOTE]
    if filled:
        notes.append(f"lab: {', '.join(filled)} read from the host's cgroup by payctl (cpu as % of one core): "
                     "Prometheus has no cgroup figure for them yet")  # fmt: skip
    return LiveFigures(nodes, figures.targets, figures.source, (*figures.notes, *notes))


@dataclass
class PromSampler:
    """``verification.Sampler`` over Prometheus: notes the run's wall-clock window, then reads the series for it.

    ``sample`` only records time (no query during the load); ``series`` asks Prometheus once per series with a
    ``step`` of a few seconds, and returns points as seconds since the run's start, as the report wants.
    """

    client: PromClient
    step_s: float = 5.0
    clock: Callable[[], float] = time.time
    _start: float | None = None
    _end: float | None = None
    errors: list[str] = field(default_factory=list)

    def sample(self, t: float) -> None:
        now = self.clock()
        if self._start is None:
            self._start = now - t
        self._end = now

    def series(self) -> ServerSeries:
        from payctl.prom import MonitoringError

        if self._start is None or self._end is None:
            return ServerSeries()
        start, end = self._start, self._end
        per: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
        for key, expr in RUN_SERIES.items():
            try:
                result = self.client.query_range(expr, start, end + self.step_s, self.step_s)
            except MonitoringError as exc:
                self.errors.append(f"{key}: {exc.message}")
                continue
            for r in result:
                pts = [(round(t - start, 3), v) for t, v in r.points if v == v]
                per.setdefault(key, {})[r.labels.get("node", "total")] = pts  # type: ignore[assignment]
        lag = per.get("consumer_lag", {})
        return ServerSeries(cpu_percent=per.get("cpu_percent", {}), memory_mb=per.get("memory_mb", {}),
                            consumer_lag=next(iter(lag.values()), ()))  # fmt: skip


def unhealthy(targets: Sequence[ScrapeTarget]) -> list[ScrapeTarget]:
    return [t for t in targets if t.health != "up"]


def prometheus_node(inv: Inventory) -> Node | None:
    """The node that carries the monitoring role (Prometheus listens on its private address)."""
    found = inv.with_role("monitoring")
    return found[0] if found else None


def lab_cgroup_figures(inv: Inventory, interval_s: float = 1.0) -> dict[str, dict[str, float]]:
    """Per lab host: CPU (% of one core, over ``interval_s``) and memory (MB) from its cgroup; {} when unavailable."""
    from payctl.errors import PayctlError
    from payctl.lab import detect_cgroups, layout
    from payctl.labmetrics import LabSampler

    try:
        sampler = LabSampler(layout(inv), detect_cgroups())
    except (PayctlError, OSError):
        return {}
    t0 = time.monotonic()
    sampler.sample(0.0)
    time.sleep(interval_s)
    sampler.sample(time.monotonic() - t0)
    s = sampler.series()
    out: dict[str, dict[str, float]] = {}
    for node, pts in s.cpu_percent.items():
        if pts and pts[-1][1] is not None:
            out.setdefault(node, {})["cpu"] = round(float(pts[-1][1]), 1)
    for node, pts in s.memory_mb.items():
        if pts and pts[-1][1] is not None:
            out.setdefault(node, {})["memory"] = round(float(pts[-1][1]), 1)
    return out


@dataclass(frozen=True)
class MonitoringStatus:
    """``payctl status``'s monitoring part: figures when Prometheus answered, else why not."""

    figures: LiveFigures | None
    error: str = ""
    hint: str = ""


def status(inv: Inventory, home: Path, lab: bool) -> MonitoringStatus:
    """Live figures per node from the deployment's Prometheus, through an SSH tunnel to the monitoring node."""
    from payctl.plan import PORTS
    from payctl.prom import MonitoringError, tunnel

    node = prometheus_node(inv)
    if node is None:
        return MonitoringStatus(None, "no node carries the monitoring role", "monitoring comes with phase 4")
    try:
        with tunnel(inv, home, node.name, node.private_address, PORTS["prometheus"]) as client:
            figures = live_figures(client, f"prometheus on {node.name} ({node.private_address}:{PORTS['prometheus']})")
    except MonitoringError as exc:
        return MonitoringStatus(None, exc.message, exc.hint)
    if lab:
        missing = lab_cgroups_missing(figures, [n.name for n in inv.nodes])
        local = lab_cgroup_figures(inv) if missing else {}
        figures = with_lab_cgroups(figures, {n: v for n, v in local.items() if n in missing})
    return MonitoringStatus(figures)


@dataclass
class CombinedSampler:
    """The run's server series: lab cgroup CPU/memory where given (``local``), Prometheus for the rest."""

    prom: PromSampler
    local: Sampler | None = None

    def sample(self, t: float) -> None:
        self.prom.sample(t)
        if self.local is not None:
            self.local.sample(t)

    def series(self) -> ServerSeries:
        p = self.prom.series()
        mine = self.local.series() if self.local is not None else ServerSeries()
        return ServerSeries(cpu_percent=mine.cpu_percent or p.cpu_percent, memory_mb=mine.memory_mb or p.memory_mb,
                            consumer_lag=p.consumer_lag or mine.consumer_lag)  # fmt: skip


@contextmanager
def run_sampler(inv: Inventory, home: Path, local: Sampler | None = None) -> Iterator[Sampler | None]:
    """For ``payctl verify``: a sampler reading the deployment's Prometheus over SSH for the run window (open for
    the whole run), combined with ``local``; just ``local`` when there is no Prometheus to reach."""
    from payctl.plan import PORTS
    from payctl.prom import MonitoringError, tunnel

    node = prometheus_node(inv)
    if node is None:
        yield local
        return
    with ExitStack() as stack:
        try:
            client = stack.enter_context(tunnel(inv, home, node.name, node.private_address, PORTS["prometheus"]))
            reachable = client.ready()
        except MonitoringError:
            reachable = False
        yield CombinedSampler(PromSampler(client), local) if reachable else local
