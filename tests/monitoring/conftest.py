"""Real monitoring pieces on loopback: payapp serve (2 workers), a node exporter and Prometheus with payctl's rules.

- ``rendered(inventory, phase)``: payctl's rendered files ({node/path: text}) for a bundled inventory.
- ``stack``: payapp serve + node exporter + Prometheus (1 s scrapes, the rendered rules), module scope; every process
  is stopped by the pid this module started.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.prom import PromClient, direct
from payctl.render import render
from tests.app.conftest import AppDatabase, ServeProcess, make_env, new_database, start_serve
from tests.support.services import MariaDB, Redis, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def rendered(inventory: str, phase: int) -> dict[str, str]:
    inv = load_inventory(REPO / "inventories" / f"{inventory}.yml")
    return {f.key: f.text for f in render(make_plan(inv, load_phase(phase))).values()}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Stack:
    serve: ServeProcess
    node_exporter_port: int
    prometheus_port: int
    db: AppDatabase

    def client(self) -> PromClient:
        return PromClient(direct("127.0.0.1", self.prometheus_port), "127.0.0.1")


PROM_CONFIG = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules/payctl.rules.yml]
scrape_configs:
  - job_name: payapp
    static_configs:
      - targets: ["127.0.0.1:{app}"]
        labels: {{node: node1}}
  - job_name: node
    static_configs:
      - targets: ["127.0.0.1:{node}"]
        labels: {{node: node1}}
"""


@pytest.fixture(scope="module")
def stack(mariadb: MariaDB, redis_server: Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("monitoring")
    db = new_database(mariadb, "mon")
    procs: list[subprocess.Popen[bytes]] = []
    serve = start_serve(make_env(db.url, redis_server.url()), tmp / "serve.log", workers=2)
    try:
        ne_port, prom_port = free_port(), free_port()
        with (tmp / "node-exporter.log").open("ab") as log:
            procs.append(subprocess.Popen(
                ["/usr/bin/prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{ne_port}",
                 "--collector.disable-defaults", "--collector.cpu", "--collector.meminfo", "--collector.filesystem"],
                stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        (tmp / "rules").mkdir()
        rules = rendered("ktcloud-1node", 4)["node1/prometheus/rules/payctl.rules.yml"]
        (tmp / "rules" / "payctl.rules.yml").write_text(rules)
        (tmp / "prometheus.yml").write_text(PROM_CONFIG.format(app=serve.port, node=ne_port))
        with (tmp / "prometheus.log").open("ab") as log:
            procs.append(subprocess.Popen(
                ["/usr/bin/prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        serve.wait_ready()
        st = Stack(serve, ne_port, prom_port, db)
        client = st.client()
        wait_until(client.ready, 30, "Prometheus ready")
        wait_until(lambda: all(t.health == "up" for t in client.targets()) and len(client.targets()) == 2, 30,
                   "both targets scraped")  # fmt: skip
        yield st
    finally:
        for p in reversed(procs):
            _stop(p)
        serve.stop()
