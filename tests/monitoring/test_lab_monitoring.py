"""Monitoring on a real lab deployment: lab-1node up, phase 4 applied over SSH (Prometheus and the exporters under
the node's supervisor), then Prometheus read through an SSH tunnel as `payctl status` and `payctl verify` do.
Uses the session's shared deployment (tests/support/labs.py)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from payctl import monitoring
from payctl.cli import run
from payctl.inventory import load_inventory
from payctl.lab import detect_cgroups, layout
from payctl.labmetrics import LabSampler
from payctl.plan import PORTS
from payctl.prom import PromClient, tunnel
from tests.support.labs import SharedLab
from tests.support.services import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.lab, pytest.mark.shared_lab("lab-1node", 4)]

JOBS = {"payapp", "relay", "consumer", "node", "mysqld", "redis", "nginx", "kafka"}


@pytest.fixture
def lab_phase4(shared_lab: SharedLab) -> Path:
    """The session's shared lab-1node deployment at phase 4 (tests/support/labs.py); PAYCTL_HOME is set to it."""
    return shared_lab.home


@contextmanager
def _client(home: Path) -> Iterator[PromClient]:
    inv = load_inventory("lab-1node")
    with tunnel(inv, home, "node1", "10.77.0.11", PORTS["prometheus"]) as client:
        yield client


def _total(client: PromClient, expr: str) -> float:
    return sum(s.value for s in client.query(expr))


def test_prometheus_scrapes_every_target_healthy(lab_phase4: Path) -> None:
    with _client(lab_phase4) as client:
        def all_up(c: PromClient = client) -> bool:
            ts = c.targets()
            return {t.job for t in ts} == JOBS and all(t.health == "up" for t in ts)

        try:
            wait_until(all_up, 60, "every scrape target up", interval=2)
        finally:
            bad = [(t.job, t.health, t.last_error) for t in client.targets() if t.health != "up"]
        assert not bad
        assert all(t.node == "node1" for t in client.targets())


def test_metrics_exist_and_move_under_load_and_verify_reports_them(lab_phase4: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    moving = {
        "requests": 'sum(payapp_http_requests_total{route="/payments/authorize"})',
        "published": "sum(payapp_relay_published_total)",
        "consumed": 'sum(payapp_consumer_events_total{outcome="applied"})',
    }
    with _client(lab_phase4) as client:
        before = {k: _total(client, e) for k, e in moving.items()}
    rc = run(["verify", "-i", "lab-1node", "--rps", "20", "--duration", "10s", "--warmup", "1s", "--p95", "2s",
              "--p99", "3s", "--quiet", "--report-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    html = (tmp_path / "report.html").read_text()
    assert "CPU per node" in html and 'data-label="node1"' in html
    assert "Consumer lag" in html and 'data-label="lag"' in html  # from Prometheus, over the run window
    with _client(lab_phase4) as client:
        def moved(c: PromClient = client) -> bool:
            return all(_total(c, e) > before[k] for k, e in moving.items())

        wait_until(moved, 30, "counters moved", interval=2)
        # Per-partition lag appears once the relay's 5 s lag refresh has read the group's committed offsets.
        wait_until(lambda c=client: bool(c.query('payapp_consumer_lag{partition="0"}')), 60,
                   "per-partition consumer lag exported by the relay", interval=3)  # fmt: skip
        missing = [m for m in monitoring.METRICS if m not in monitoring.OPTIONAL
                   and not client.query(f'count({{__name__="{m}"}})')]  # fmt: skip
        assert not missing


def _requests_through_nginx(n: int, pause_s: float) -> None:
    """Bounded trickle of reads through the lab LB (an unknown payment id: 400/404, counted, not an error)."""
    for i in range(n):
        try:
            urllib.request.urlopen(f"http://10.77.0.11/payments/{900000 + i}", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 404)  # an id payapp never issued: refused, counted, not a 5xx
        time.sleep(pause_s)


def test_status_json_has_live_figures(lab_phase4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Requests in the last minute across two 15 s scrapes, so the 1-minute rate and p95 have values now.
    _requests_through_nginx(40, 0.5)
    inv = load_inventory("lab-1node")
    with _client(lab_phase4) as client:
        def has_rate(c: PromClient = client) -> bool:
            return any(s.value > 0 for s in c.query("payctl:requests:rate1m"))

        wait_until(has_rate, 45, "request rate recorded", interval=3)
    assert monitoring.status(inv, lab_phase4, True).figures is not None
    assert run(["status", "-i", "lab-1node", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    node = doc["nodes"][0]
    for key in ("cpu", "memory", "consumer_lag", "rps", "p95_ms", "disk_free_percent"):
        assert node[key] is not None, (key, node, doc.get("monitoring"))
    assert 0 <= node["cpu"] <= 100 * (os.cpu_count() or 1) and node["memory"] > 50
    assert {t["job"] for t in doc["targets"]} == JOBS and all(t["health"] == "up" for t in doc["targets"])
    assert any("cgroup" in n for n in doc["monitoring"]["notes"])
    # cpu and memory came from Prometheus (the host's cgroup via the textfile collector), not from payctl's own read
    assert not any("read from the host's cgroup by payctl" in n for n in doc["monitoring"]["notes"])
    assert run(["status", "-i", "lab-1node"]) == 0
    text = capsys.readouterr().out
    assert "8/8 scrape targets up" in text and "live: cpu" in text


def _one(client: PromClient, expr: str) -> float:
    found = client.query(expr)
    assert len(found) == 1, (expr, found)
    return found[0].value


def _load_through_nginx(threads: int, seconds: float, most: int) -> int:
    """Bounded load: threads reading an unknown id through the lab LB for `seconds`, at most `most` requests each."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + seconds

    def one(_: int) -> int:
        n = 0
        while n < most and time.monotonic() < deadline:
            _requests_through_nginx(1, 0.0)
            n += 1
        return n

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, range(threads)))


def test_node_cpu_and_memory_in_prometheus_are_the_lab_hosts_cgroup(lab_phase4: Path) -> None:
    """Lab hosts share /proc: the node exporter's figures are the whole machine's. The host's own cgroup figures
    (textfile collector) are in Prometheus, agree with the cgroup read from this machine, move under load, and the
    recording rules (status, dashboard, NodeCpuHigh) use them."""
    inv = load_inventory("lab-1node")
    node = layout(inv)[0]
    cgroups = detect_cgroups()
    mem_file = "memory.current" if cgroups.version == 2 else "memory.usage_in_bytes"
    host_memory = cgroups.dirs(node.cgroup)[-1] / mem_file
    sel = '{node="node1"}'
    with _client(lab_phase4) as client:
        def recorded(c: PromClient = client) -> bool:
            return bool(c.query(f"payctl:node_cpu_ratio:1m{sel}"))

        wait_until(recorded, 90, "the cgroup CPU ratio recorded (two scrapes of the textfile series)", interval=3)
        assert _one(client, f"payctl_lab_node_cpu_limit_cores{sel}") == node.cpus
        assert _one(client, f"payctl_lab_node_memory_limit_bytes{sel}") == node.memory_bytes
        mem = _one(client, f"payctl:node_memory_used_bytes{sel}")
        raw = _one(client, f"payctl_lab_node_memory_usage_bytes{sel}")
        assert abs(mem - raw) < 0.05 * raw, (mem, raw)  # the rule and its source, read at two instants
        assert abs(mem - int(host_memory.read_text())) < 0.25 * mem  # the same counter, up to 20 s apart
        machine = _one(client, f"node_memory_MemTotal_bytes{sel} - node_memory_MemAvailable_bytes{sel}")
        assert machine > 1.1 * mem, (machine, mem)  # the node exporter's figure is the whole machine's
        assert _one(client, f"node_memory_MemTotal_bytes{sel}") > node.memory_bytes

        before = _one(client, f"payctl_lab_node_cpu_seconds_total{sel}")
        sampler = LabSampler([node], cgroups)  # this machine's own read of the same cgroup, over the load
        t0 = time.monotonic()
        sampler.sample(0.0)
        sent = _load_through_nginx(4, 8.0, 4000)
        sampler.sample(time.monotonic() - t0)
        pts = sampler.series().cpu_percent["node1"]
        host_cpu_s = pts[-1][1] / 100 * pts[-1][0]  # type: ignore[operator]
        assert host_cpu_s > 2.0, (host_cpu_s, sent)  # 8 s of load: the node did work
        # Prometheus holds the loop's sample of up to 5 s + one 15 s scrape ago: wait for one newer than the load.
        def moved(c: PromClient = client) -> bool:
            return _one(c, f"payctl_lab_node_cpu_seconds_total{sel}") - before > 0.8 * host_cpu_s

        wait_until(moved, 45, "the node's cgroup CPU moved in Prometheus by about what the load used", interval=3)
        ratio = _one(client, f"payctl:node_cpu_ratio:1m{sel}")
        assert 0 < ratio <= 1.05
