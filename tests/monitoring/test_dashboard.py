"""The Grafana provisioning, structurally: the dashboard answers the plan's questions, every panel's PromQL parses
(promtool) and reads only metrics the deployment exports or the rendered recording rules define."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from payctl.monitoring import FIGURES, LAB_METRICS, METRICS, OPTIONAL, RUN_SERIES
from tests.monitoring.conftest import rendered
from tests.monitoring.promql import metric_names


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return rendered("ktcloud-2node", 5)


def _dashboard(files: dict[str, str]) -> dict[str, object]:
    return json.loads(files["node1/grafana/dashboards/payments.json"])  # type: ignore[no-any-return]


def _exprs(files: dict[str, str]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard(files)["panels"] for t in p["targets"]]  # type: ignore[attr-defined]


def _recorded(files: dict[str, str]) -> set[str]:
    doc = yaml.safe_load(files["node1/prometheus/rules/payctl.rules.yml"])
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def test_metric_names_parser() -> None:
    assert metric_names('sum by (node) (rate(a_total{route!~"/x|y"}[1m])) / clamp_min(b, 1e-9) * 100') == {
        "a_total", "b"}
    assert metric_names("x == 0 and on(node) y_z == 1") == {"x", "y_z"}


def test_dashboard_shape_and_panels(files: dict[str, str]) -> None:
    d = _dashboard(files)
    panels = d["panels"]
    assert isinstance(panels, list) and 8 <= len(panels) <= 14, "one small dashboard"
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"] for p in panels).lower()
    for question in ("requests per second", "p95", "error rate", "cpu", "memory", "consumer lag", "replication",
                     "disk"):  # fmt: skip
        assert question in titles
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "payctl-prometheus"}
        assert p["targets"] and all(t["expr"] for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    per_node_and_total = [p for p in panels if any("node" in t["legendFormat"] for t in p["targets"])
                          and any(t["legendFormat"] == "total" for t in p["targets"])]  # fmt: skip
    assert len(per_node_and_total) >= 4  # rps, p95, errors, memory: per node and total
    ds = yaml.safe_load(files["node1/grafana/provisioning/datasources/prometheus.yml"])
    assert ds["datasources"][0]["uid"] == "payctl-prometheus"
    assert ds["datasources"][0]["url"].endswith(":9090")


def test_every_expression_parses(files: dict[str, str], tmp_path: Path) -> None:
    exprs = [e for _, e in _exprs(files)] + list(FIGURES.values()) + list(RUN_SERIES.values())
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"parse:e{i}", "expr": e}
                                                     for i, e in enumerate(exprs)]}]}  # fmt: skip
    (tmp_path / "parse.yml").write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", "parse.yml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum by (node (up)"}]}]}))
    bad = subprocess.run(["promtool", "check", "rules", "bad.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0


def test_expressions_read_only_known_metrics(files: dict[str, str]) -> None:
    known = set(METRICS) | set(LAB_METRICS) | OPTIONAL | _recorded(files)
    rules = yaml.safe_load(files["node1/prometheus/rules/payctl.rules.yml"])
    exprs = _exprs(files) + [(k, v) for k, v in FIGURES.items()] + [(k, v) for k, v in RUN_SERIES.items()]
    exprs += [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    unknown = {(title, name) for title, e in exprs for name in metric_names(e) - known}
    assert not unknown
