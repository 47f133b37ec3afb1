from __future__ import annotations

import copy
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from payctl.errors import ConfigError
from payctl.inventory import Inventory, inventory_reference, load_inventory, parse_inventory, resolve_inventory_path
from payctl.paths import data_dir

REPO = Path(__file__).resolve().parents[2]
BUNDLED = ["ktcloud-1node", "ktcloud-2node", "lab-1node", "lab-2node"]


def _good() -> dict[str, Any]:
    return {
        "deployment": "shop",
        "runtime": "native",
        "target_rps": 400,
        "nodes": [
            {
                "name": "node1",
                "public_address": "203.0.113.10",
                "private_address": "198.51.100.11",
                "ssh": {"user": "root", "key": "keys/shop", "port": 22},
                "cpus": 4,
                "memory_gb": 16,
                "disk_gb": 100,
                "roles": ["app", "consumer", "mariadb", "redis", "kafka", "lb", "monitoring"],
            }
        ],
    }


def _write(tmp_path: Path, data: object, name: str = "inv.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(path: Path | str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert info.value.exit_code == 2
    return info.value.problems


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_inventories_load(name: str) -> None:
    inv = load_inventory(REPO / "inventories" / f"{name}.yml")
    assert isinstance(inv, Inventory)
    # A bare name finds the same bundled file.
    assert load_inventory(name) == inv


def test_bundled_inventories_match_the_issue() -> None:
    one, two = load_inventory("ktcloud-1node"), load_inventory("ktcloud-2node")
    assert one.deployment == two.deployment and one.runtime == two.runtime == "compose"
    assert [n.name for n in two.nodes] == ["node1", "node2", "witness"]
    assert two.node("node2").public_address is None and two.node("node2").via == "node1"
    assert two.node("witness").roles == ("witness",)
    for inv in (one, two):
        for node in inv.nodes:
            assert node.private_address.startswith("198.51.100.")
            assert node.public_address is None or node.public_address.startswith("203.0.113.")
    lab1, lab2 = load_inventory("lab-1node"), load_inventory("lab-2node")
    assert lab1.deployment == lab2.deployment == "lab" and lab2.runtime == "native"
    assert [n.private_address for n in lab2.nodes] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert {lab2.node_prefix(n.name) for n in lab2.nodes} == {
        "/var/lib/payctl-lab/node1",
        "/var/lib/payctl-lab/node2",
        "/var/lib/payctl-lab/witness",
    }
    assert all(n.ssh.key == "lab/id_ed25519" for n in lab2.nodes)
    # Honest sizes: lab hosts share a 2-core machine.
    assert sum(n.cpus for n in lab2.nodes) <= 2.5


def test_ssh_key_resolves_against_payctl_home_and_need_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path / "home"))
    node = load_inventory("lab-1node").nodes[0]
    assert node.ssh.key_path() == tmp_path / "home" / "lab" / "id_ed25519"
    assert not node.ssh.key_path().exists()
    monkeypatch.delenv("PAYCTL_HOME")
    monkeypatch.chdir(tmp_path)
    assert node.ssh.key_path() == tmp_path / ".payctl" / "lab" / "id_ed25519"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    home_key = node.ssh.model_copy(update={"key": "~/.ssh/id_ed25519"})
    assert home_key.key_path() == tmp_path / "user" / ".ssh" / "id_ed25519"


def test_models_are_frozen() -> None:
    inv = load_inventory("lab-1node")
    with pytest.raises(ValueError):
        inv.nodes[0].cpus = 8  # type: ignore[misc]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_inventory(tmp_path / "nope.yml")
    assert info.value.message == f"inventory not found: {tmp_path / 'nope.yml'}"
    assert "lab-1node" in info.value.hint


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("deployment: shop\nnodes:\n  - name: node1\n   cpus: [4\n")
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert info.value.message.startswith(f"{path}: invalid YAML at line 4")


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yml"
    path.write_text("deployment: shop\nruntime: native\nnodes: []\nruntime: compose\n")
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert info.value.message == f"{path}: invalid YAML at line 4, column 1: duplicate key 'runtime'"


def test_every_problem_is_listed_by_path(tmp_path: Path) -> None:
    data = _good()
    data["prefx"] = "/srv"
    data["deployment"] = "Shop"
    node = data["nodes"][0]
    node["memory_gb"] = 0
    node["cpus"] = -1
    node["ssh"]["prot"] = 2222
    node["roles"] = ["app", "consumer", "redis", "kafka", "lb", "monitoring"]
    second = copy.deepcopy(node)
    second["private_address"] = "198.51.100.11"
    second["public_address"] = "203.0.113.11"
    second["via"] = "node9"
    data["nodes"].append(second)
    problems = _problems(_write(tmp_path, data))
    assert problems == [
        "deployment: must match ^[a-z][a-z0-9-]{0,30}$",
        "nodes[0].ssh.prot: unknown key; did you mean 'port'?",
        "nodes[0].cpus: must be > 0",
        "nodes[0].memory_gb: must be > 0",
        "nodes[1].ssh.prot: unknown key; did you mean 'port'?",
        "nodes[1].cpus: must be > 0",
        "nodes[1].memory_gb: must be > 0",
        "prefx: unknown key; did you mean 'prefix'?",
        "nodes[1].name: duplicate node name 'node1' (also nodes[0])",
        "nodes[1].private_address: duplicate address 198.51.100.11 (also nodes[0].private_address)",
        "nodes[1].via: unknown node 'node9' (nodes: node1)",
        "nodes: no node has the role 'mariadb'",
        "nodes: only one node may have the role 'lb' (nodes[0], nodes[1] do)",
        "nodes: only one node may have the role 'monitoring' (nodes[0], nodes[1] do)",
    ]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("nodes", 0, "name"), "node1; rm -rf /", "nodes[0].name: must match ^[a-z][a-z0-9-]{0,30}$"),
        (("nodes", 0, "private_address"), "10.0.0.1$(id)", "nodes[0].private_address: '10.0.0.1$(id)' is not an IP address"),  # noqa: E501
        (("nodes", 0, "private_address"), "127.0.0.1", "nodes[0].private_address: 127.0.0.1 cannot address a host (unspecified, loopback or multicast)"),  # noqa: E501
        (("nodes", 0, "ssh", "key"), "keys/`id`", "nodes[0].ssh.key: must be a plain path (letters, digits, . _ / + -; no whitespace, quotes, $ or backticks)"),  # noqa: E501
        (("nodes", 0, "ssh", "user"), "root'", "nodes[0].ssh.user: must match ^[a-z_][a-z0-9_-]{0,31}$"),
        (("prefix",), "/opt/pay ctl", "prefix: must be a plain path (letters, digits, . _ / + -; no whitespace, quotes, $ or backticks)"),  # noqa: E501
        (("prefix",), "opt/payctl", "prefix: must be an absolute path"),
        (("prefix",), "/opt/../etc", "prefix: must not contain '..'"),
        (("runtime",), "docker", "runtime: must be one of 'compose' or 'native'"),
        (("nodes", 0, "roles"), ["app", "witness"], "nodes[0].roles: a witness carries no other role (it runs only a Redis Sentinel and a Kafka controller)"),  # noqa: E501
        (("nodes", 0, "roles"), ["app", "db"], "nodes[0].roles[1]: must be one of 'app', 'consumer', 'mariadb', 'redis', 'kafka', 'lb', 'monitoring' or 'witness'"),  # noqa: E501
        (("nodes", 0, "memory_gb"), 0.5, "nodes[0].memory_gb: a node running services needs at least 1 GB, got 0.5"),
        (("nodes", 0, "disk_gb"), 1, "nodes[0].disk_gb: at least 2 GB are needed, got 1"),
        (("nodes", 0, "ssh", "port"), 70000, "nodes[0].ssh.port: must be <= 65535"),
        (("overrides", "cpus"), {"app": 0}, "overrides.cpus: app: must be > 0 and <= 512"),
        (("overrides", "cpu"), {"app": 1}, "overrides.cpu: unknown key; did you mean 'cpus'?"),
        (("nodes", 0, "via"), "node1", "nodes[0].via: a node cannot be its own jump host"),
    ],
)  # fmt: skip
def test_bad_values(tmp_path: Path, path: tuple[str | int, ...], value: object, expected: str) -> None:
    data = _good()
    target: Any = data
    for part in path[:-1]:
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    target[path[-1]] = value
    assert expected in _problems(_write(tmp_path, data))


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_inventory(_write(tmp_path, ["node1"]))
    assert "the inventory must be a mapping" in info.value.message


def test_shared_node_must_be_described_identically(tmp_path: Path) -> None:
    one = _good()
    two = copy.deepcopy(one)
    two["nodes"].append(
        {
            "name": "node2",
            "private_address": "198.51.100.12",
            "via": "node1",
            "ssh": {"key": "keys/shop"},
            "cpus": 4,
            "memory_gb": 16,
            "disk_gb": 100,
            "roles": ["app", "mariadb"],
        }
    )
    two["nodes"][0]["memory_gb"] = 32
    _write(tmp_path, one, "shop-1node.yml")
    path = _write(tmp_path, two, "shop-2node.yml")
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    assert info.value.message == f"{path}: inventory disagrees with another inventory of deployment 'shop'"
    assert info.value.problems == [
        "nodes[0] (node1): described differently in shop-1node.yml (same deployment): memory_gb 32.0 vs 16.0"
    ]
    # Another deployment in the same folder is not compared.
    two["deployment"] = "other"
    assert load_inventory(_write(tmp_path, two, "shop-2node.yml")).deployment == "other"


def test_shared_node_must_keep_its_position(tmp_path: Path) -> None:
    one = _good()
    two = copy.deepcopy(one)
    node2 = copy.deepcopy(one["nodes"][0]) | {"name": "node2", "private_address": "198.51.100.12", "roles": ["app"]}
    del node2["public_address"]
    two["nodes"].insert(0, node2)
    _write(tmp_path, one, "a.yml")
    problems = _problems(_write(tmp_path, two, "b.yml"))
    assert problems == [
        "nodes[1] (node1): is nodes[0] in a.yml (same deployment); keep shared nodes first and in the same order"
    ]


def test_a_path_wins_over_a_bundled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, _good(), "lab-1node")
    assert resolve_inventory_path("lab-1node") == Path("lab-1node")
    assert load_inventory("lab-1node").deployment == "shop"
    assert resolve_inventory_path("lab-2node") == data_dir("inventories") / "lab-2node.yml"


@pytest.mark.slow
def test_non_editable_install_ships_inventories_and_phases(tmp_path: Path) -> None:
    """`pip install .` (not editable) into a throwaway venv finds the bundled inventories and phases."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    venv_site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # payctl's dependencies come from the project venv (a plain path entry: its editable-install hooks stay off).
    (venv_site / "payctl-deps.pth").write_text(purelib + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(venv_site), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    py = venv / "bin" / "python"
    script = (
        "import payctl.inventory as i, payctl.phase as p; "
        "print(i.__file__); print(i.load_inventory('lab-2node').deployment); print(p.load_phase(5).gate.rps); "
        "print(i.data_dir('inventories'))"
    )
    out = subprocess.run([py, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    lines = out.splitlines()
    assert str(venv) in lines[0], lines  # the installed copy, not the checkout
    assert lines[1:3] == ["lab", "1000"]
    assert lines[3].startswith(str(venv))


@pytest.mark.parametrize("name", BUNDLED)
def test_model_dump_round_trips(name: str) -> None:
    inv = load_inventory(name)
    assert parse_inventory(inv.model_dump()) == inv


def test_docs_inventory_md_is_generated_from_the_model(update_golden: bool) -> None:
    doc = REPO / "docs" / "inventory.md"
    text = inventory_reference()
    if update_golden:
        doc.write_text(text)
    assert doc.read_text() == text, (
        "docs/inventory.md is stale: run pytest tests/toolkit/test_inventory.py --update-golden"
    )
    for model in (Inventory,):
        for name in model.model_fields:
            assert f"| `{name}` |" in text


def test_one_lb_and_one_monitoring_node(tmp_path: Path) -> None:
    data = _good()
    second = copy.deepcopy(data["nodes"][0]) | {"name": "node2", "private_address": "198.51.100.12"}
    del second["public_address"]
    data["nodes"].append(second)
    assert _problems(_write(tmp_path, data)) == [
        "nodes: only one node may have the role 'lb' (nodes[0], nodes[1] do)",
        "nodes: only one node may have the role 'monitoring' (nodes[0], nodes[1] do)",
    ]


def test_inventories_of_one_deployment_agree_on_runtime(tmp_path: Path) -> None:
    one = _good()
    _write(tmp_path, one, "shop-1node.yml")
    two = copy.deepcopy(one) | {"runtime": "compose"}
    assert _problems(_write(tmp_path, two, "shop-2node.yml")) == [
        "runtime: 'compose' but shop-1node.yml (same deployment) says 'native'"
    ]


def test_ssh_key_in_the_users_home_is_accepted_but_not_other_tilde_forms(tmp_path: Path) -> None:
    data = _good()
    data["nodes"][0]["ssh"]["key"] = "~/.ssh/id_ed25519"
    assert load_inventory(_write(tmp_path, data)).nodes[0].ssh.key == "~/.ssh/id_ed25519"
    data["nodes"][0]["ssh"]["key"] = "~root/.ssh/id_ed25519"
    assert _problems(_write(tmp_path, data)) == [
        "nodes[0].ssh.key: must be a plain path (letters, digits, . _ / + -; no whitespace, quotes, $ or backticks)"
    ]
