"""Bad configuration given to `payctl phaseN apply`: each refused with the exact message, hint and exit code, before
any host is contacted (cases that need hosts are in tests/deploy/test_lab_apply.py and tests/lab/test_lab_e2e.py;
docs/reliability.md links them all)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from payctl import preflight
from payctl.cli import run
from payctl.errors import DeployError
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.runtimes import NodeFacts

REPO = Path(__file__).resolve().parents[2]
APPLY = ["phase1", "apply", "--yes", "--no-verify", "-i"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Any socket connection attempt is recorded and refused; PAYCTL_HOME is a fresh folder."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path / "home"))
    return attempts


def _lab(tmp_path: Path, name: str, **changes: Any) -> Path:
    data = yaml.safe_load((REPO / "inventories" / "lab-1node.yml").read_text())
    for key, value in changes.items():
        if key.startswith("node_"):
            data["nodes"][0][key.removeprefix("node_")] = value
        else:
            data[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_broken_yaml(tmp_path: Path, no_network: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yml"
    path.write_text("deployment: lab\nruntime: native\nnodes:\n  - name: node1\n   cpus: [4\n")
    assert run([*APPLY, str(path)]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"error: {path}: invalid YAML at line 5, column 4: expected <block end>, but found '<block mapping start>'\n"
        "hint: fix the YAML (indentation, a missing ':', an unclosed quote, a key given twice)\n"
    )
    assert out == "" and no_network == [] and not (tmp_path / "home").exists()


def test_unknown_keys(tmp_path: Path, no_network: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = _lab(tmp_path, "unknown.yml", node_sshh={"user": "root"}, tsl={"enabled": True})
    assert run([*APPLY, str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: invalid inventory\n"
        "  - nodes[0].sshh: unknown key; did you mean 'ssh'?\n"
        "  - tsl: unknown key; did you mean 'tls'?\n"
        "hint: fix the keys listed above; docs/inventory.md describes every key\n"
    )
    assert no_network == [] and not (tmp_path / "home").exists()


def test_impossible_sizes_are_refused_before_any_host_is_contacted(
    tmp_path: Path, no_network: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _lab(tmp_path, "big.yml", overrides={"memory_mb": {"mariadb": 8000}})
    assert run([*APPLY, str(path)]) == 2
    assert capsys.readouterr().err == (
        "error: lab: the capacity plan for phase 1 does not fit\n"
        "  - node1: memory limits sum to 9056 MB but the node has 3072 MB (304 MB reserved for the OS): app 192, "
        "relay 96, mariadb 8000, redis 96, kafka 640, nginx 32\n"
        "hint: lower overrides.cpus/memory_mb, use bigger nodes, or set overrides.allow_overcommit "
        "(payctl plan: --allow-overcommit) to go ahead anyway\n"
    )
    # Before the early plan check, apply connected over SSH, took the lock and only then refused.
    assert no_network == [] and not (tmp_path / "home").exists()
    path = _lab(tmp_path, "zero.yml", node_memory_gb=0)
    assert run([*APPLY, str(path)]) == 2
    assert "  - nodes[0].memory_gb: must be > 0\n" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ port preflight

SS = """\
LISTEN 0      80         0.0.0.0:3306      0.0.0.0:*    users:(("mariadbd",pid=812,fd=21))
LISTEN 0      4096   127.0.0.53%lo:53      0.0.0.0:*    users:(("systemd-resolve",pid=400,fd=14))
LISTEN 0      511     10.77.0.11:80        0.0.0.0:*    users:(("nginx",pid=77,fd=6),("nginx",pid=78,fd=6))
LISTEN 0      128           [::]:22           [::]:*    users:(("sshd",pid=9,fd=4))
LISTEN 0      128      127.0.0.1:6379      0.0.0.0:*
"""


def test_listeners_are_parsed_from_ss() -> None:
    assert preflight.parse_listeners(SS) == [
        preflight.Listener("0.0.0.0", 3306, "mariadbd", 812),
        preflight.Listener("127.0.0.53", 53, "systemd-resolve", 400),
        preflight.Listener("10.77.0.11", 80, "nginx", 77),
        preflight.Listener("::", 22, "sshd", 9),
        preflight.Listener("127.0.0.1", 6379),
    ]
    assert preflight.Listener("::", 1).process == "another program"


def test_a_port_taken_on_a_new_node_is_named_and_a_live_node_is_not_checked() -> None:
    plan = make_plan(load_inventory("lab-1node"), load_phase(1))
    calls: list[str] = []

    def shell(command: str) -> tuple[bool, str, str]:
        calls.append(command)
        return True, SS, ""

    with pytest.raises(DeployError) as err:
        preflight.check_free_ports(plan, {"node1": NodeFacts()}, {"node1": shell})
    # 3306 on a wildcard and 80 on the node's own address collide; 6379 on 127.0.0.1 does not (Redis binds
    # 10.77.0.11), nor 22 (not ours), nor 443 (TLS is off in the lab).
    assert err.value.message == (
        'node1: port 3306 on 10.77.0.11 (mariadb) is already taken by "mariadbd" (pid 812), listening on '
        '0.0.0.0:3306; node1: port 80 on 10.77.0.11 (nginx) is already taken by "nginx" (pid 77), listening on '
        "10.77.0.11:80"
    )
    assert err.value.hint.startswith("payctl never takes over a port it did not open")
    assert calls == [preflight.LISTENERS_COMMAND]
    calls.clear()
    preflight.check_free_ports(plan, {"node1": NodeFacts(marker='{"deployment": "lab"}')}, {"node1": shell})
    preflight.check_free_ports(plan, {"node1": NodeFacts(supervisord_pid=5)}, {"node1": shell})
    assert calls == []  # a node that runs the deployment holds its own ports


def test_on_systemd_vms_the_debian_daemons_the_apply_stops_itself_are_not_conflicts() -> None:
    listeners = preflight.parse_listeners(SS)
    binds = [("mariadb", "10.77.0.11", 3306), ("nginx", "10.77.0.11", 80)]
    assert len(preflight.conflicts(binds, listeners)) == 2
    assert preflight.conflicts(binds, listeners, preflight.DEBIAN_DAEMONS) == []
    squatter = [preflight.Listener("0.0.0.0", 3306, "python3", 5)]
    assert preflight.conflicts(binds, squatter, preflight.DEBIAN_DAEMONS) == [
        'port 3306 on 10.77.0.11 (mariadb) is already taken by "python3" (pid 5), listening on 0.0.0.0:3306'
    ]
