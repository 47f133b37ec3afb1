from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from payctl.cli import run
from payctl.inventory import load_inventory

HINT = "hint: fix the keys listed above; docs/inventory.md describes every key\n"


def _bad_inventory(tmp_path: Path, **node_changes: object) -> Path:
    data = load_inventory("ktcloud-1node").model_dump(exclude_none=True, mode="json")
    data["nodes"][0].update(node_changes)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "lab-1node"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "capacity plan: deployment lab, phase 1, runtime native"
    assert "node1 (10.77.0.11) 1 CPUs, 3072 MB; OS reserve 0.1 CPUs, 304 MB" in out
    assert (
        "roles: MariaDB primary node1; Redis master node1; Kafka brokers node1, controllers node1; LB node1 -> node1"
        in out
    )
    assert "kafka: 12 partitions, replication factor 1, min.insync.replicas 1" in out
    assert "rate limits (per merchant per minute, whole cluster): authorize 30000, capture 30000, refund 15000" in out
    assert "why" not in lines


def test_plan_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "ktcloud-2node", "--phase", "5", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "node2.mariadb.innodb_buffer_pool_size_mb" in out
    assert "mariadb.max_connections" in out
    assert "Sentinels node1, node2, witness (quorum 2)" in out


def test_plan_json_prints_only_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "inventories/ktcloud-2node.yml", "--phase", "5", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert err == ""
    assert data["phase"] == 5 and data["deployment"] == "ktcloud-pay"
    assert [n["name"] for n in data["nodes"]] == ["node1", "node2", "witness"]
    assert data["topology"]["kafka_controllers"] == ["node1", "node2", "witness"]
    assert data["nodes"][0]["cpus_allocated"] <= 3.75


def test_bad_inventory_exit_2_and_exact_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _bad_inventory(tmp_path, memory_gb=0, cpuz=4)
    assert run(["plan", "-i", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: {path}: invalid inventory\n"
        "  - nodes[0].memory_gb: must be > 0\n"
        "  - nodes[0].cpuz: unknown key; did you mean 'cpus'?\n" + HINT
    )


def test_missing_inventory(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "no-such-inventory"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: inventory not found: no-such-inventory\n"
        "hint: give a path to a YAML file, or a bundled inventory name: ktcloud-1node, ktcloud-2node, lab-1node, "
        "lab-2node\n"
    )


def test_overcommit_is_an_error_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_inventory("ktcloud-1node").model_dump(exclude_none=True, mode="json")
    data["overrides"] = {"cpus": {"app": 2, "consumer": 1.5, "mariadb": 0.5, "redis": 0.25, "kafka": 0.25}}
    path = tmp_path / "table.yml"
    path.write_text(yaml.safe_dump(data))
    assert run(["plan", "-i", str(path), "--phase", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "error: ktcloud-pay: the capacity plan for phase 2 does not fit\n"
        "  - node1: CPU limits sum to 4.6 but the node has 4 CPUs (0.25 reserved for the OS): app 2, relay 0.05, "
        "consumer 1.5, mariadb 0.5, redis 0.25, kafka 0.25, nginx 0.05\n"
        "hint: lower overrides.cpus/memory_mb, use bigger nodes, or set overrides.allow_overcommit "
        "(payctl plan: --allow-overcommit) to go ahead anyway\n"
    )
    assert run(["plan", "-i", str(path), "--phase", "2", "--allow-overcommit"]) == 0
    out = capsys.readouterr().out
    assert "warning: over-commit allowed: node1: CPU limits sum to 4.6" in out


def test_phase5_on_one_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "ktcloud-1node", "--phase", "5"]) == 2
    assert capsys.readouterr().err == (
        "error: ktcloud-pay: the inventory cannot carry phase 5\n"
        "  - phase 5 needs a node named 'node2' in the inventory (nodes: node1)\n"
        "  - phase 5 needs 2 nodes with the role 'app', the inventory has 1\n"
        "hint: use an inventory with the nodes and roles the phase needs (e.g. a 2-node inventory for phase 5)\n"
    )


def test_phase_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "-i", "lab-1node", "--phase", "6"]) == 2
    assert "Invalid value for '--phase'" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "--help"]) == 0
    assert "payctl plan -i lab-2node --phase 5 --explain" in capsys.readouterr().out
