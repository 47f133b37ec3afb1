"""Against a real Prometheus scraping a real ``payapp serve`` (2 workers) and a node exporter on loopback:
the app's metrics are totals over its workers, the figures ``payctl status`` shows and the series ``payctl verify``
puts in its report come back per node, and every dashboard expression evaluates."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import requests

from payctl.monitoring import FIGURES, CombinedSampler, PromSampler, live_figures
from payctl.prom import MonitoringError, PromClient, direct
from payctl.report import ServerSeries
from tests.monitoring.conftest import Stack, rendered
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.slow


def _load(url: str, n: int) -> None:
    m = "m-" + uuid.uuid4().hex[:10]
    for i in range(n):  # a new connection each: SO_REUSEPORT spreads them over the workers
        with requests.Session() as s:
            r = s.post(url + "/payments/authorize", timeout=10,
                       json={"merchantId": m, "amount": 10, "currency": "KRW", "idempotencyKey": f"k{i}"})
            assert r.status_code in (200, 201), r.text


def _count(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("payapp_http_requests_total{") and 'route="/payments/authorize"' in line)


def test_app_metrics_are_totals_of_all_workers(stack: Stack) -> None:
    url = stack.serve.url
    before = _count(requests.get(url + "/metrics", timeout=5).text)
    _load(url, 40)
    seen = set()
    for _ in range(6):
        with requests.Session() as s:
            text = s.get(url + "/metrics", timeout=5).text
        seen.add(_count(text) - before)
        for name in ("payapp_db_pool_size", "payapp_db_pool_in_use", "payapp_db_pool_waiting",
                     'payapp_ratelimit_rejected_total{action="authorize"} 0.0', "payapp_ratelimit_fallback_total",
                     "payapp_http_request_duration_seconds_bucket"):  # fmt: skip
            assert name in text
    assert seen == {40.0}
    wait_until(lambda: "payapp_db_pool_size 2.0" in requests.get(url + "/metrics", timeout=5).text
               or "payapp_db_pool_size 1.0" in requests.get(url + "/metrics", timeout=5).text, 10,
               "pool gauges sampled")  # fmt: skip


def test_live_figures_and_targets(stack: Stack) -> None:
    client = stack.client()
    for _ in range(3):  # a counter's first sample has no rate: load across several scrapes
        _load(stack.serve.url, 10)
        time.sleep(1.5)

    def has_rps() -> bool:
        return live_figures(client, "test").node("node1").get("rps", 0) > 0

    wait_until(has_rps, 30, "request rate in Prometheus", interval=1)
    f = live_figures(client, "loopback")
    node = f.node("node1")
    for key in ("cpu", "memory", "rps", "p95_ms", "error_percent", "disk_free_percent"):
        assert key in node, (key, node)
    assert 0 <= node["cpu"] <= 100 and node["memory"] > 10 and 0 < node["p95_ms"] < 10_000
    assert node["error_percent"] == 0
    assert {(t.job, t.health) for t in f.targets} == {("payapp", "up"), ("node", "up")}
    d = f.as_dict()
    assert d["nodes"]["node1"]["rps"] > 0 and len(d["targets"]) == 2  # type: ignore[index]


def test_run_series_for_the_report(stack: Stack) -> None:
    sampler = PromSampler(stack.client(), step_s=1.0)
    t0 = time.monotonic()
    for _ in range(4):
        _load(stack.serve.url, 10)
        sampler.sample(time.monotonic() - t0)
        time.sleep(0.5)
    time.sleep(2)  # one more scrape of the window's end
    s = sampler.series()
    assert not sampler.errors
    points = s.cpu_percent["node1"]
    assert len(points) >= 2 and all(0 <= v <= 100 * (os.cpu_count() or 1) + 5 for _, v in points if v is not None)
    assert points[0][0] >= -0.01 and points[-1][0] <= time.monotonic() - t0 + 2
    assert s.memory_mb["node1"]


def test_every_dashboard_expression_evaluates(stack: Stack) -> None:
    import json

    client = stack.client()
    d = json.loads(rendered("ktcloud-1node", 4)["node1/grafana/dashboards/payments.json"])
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]] + list(FIGURES.values())
    for e in exprs:
        client.query(e)  # raises MonitoringError when Prometheus rejects it
    with pytest.raises(MonitoringError, match="bad_data"):
        client.query("sum by (node (up)")


def test_unreachable_prometheus_is_a_clear_error() -> None:
    client = PromClient(direct("127.0.0.1", free_port(), timeout=2), "127.0.0.1")
    assert not client.ready()
    with pytest.raises(MonitoringError, match="cannot reach Prometheus"):
        client.query("up")


class _Cgroups:
    """Stands in for the lab's cgroup sampler (a seam payctl owns): one CPU point, no memory."""

    def __init__(self) -> None:
        self.calls = 0

    def sample(self, t: float) -> None:
        self.calls += 1

    def series(self) -> ServerSeries:
        return ServerSeries(cpu_percent={"node1": [(0.0, 5.0)]})


def test_combined_sampler_takes_lab_cpu_and_prometheus_for_the_rest(stack: Stack) -> None:
    local = _Cgroups()
    sampler = CombinedSampler(PromSampler(stack.client(), step_s=1.0), local)
    t0 = time.monotonic()
    for _ in range(3):
        _load(stack.serve.url, 5)
        sampler.sample(time.monotonic() - t0)
        time.sleep(1)
    s = sampler.series()
    assert local.calls == 3
    assert s.cpu_percent == {"node1": [(0.0, 5.0)]}
    assert s.memory_mb["node1"] and not s.consumer_lag  # no relay on loopback: no lag series
