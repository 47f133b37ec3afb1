"""The real lab on this machine: lab-2node up, reachable, confined, idempotent, and gone after down.

Tests in this module run in file order on one module-scoped lab; the last one takes it down.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pyinfra.operations import files, server

from payctl import hosts, lab
from payctl.cli import run
from payctl.errors import DeployError
from payctl.inventory import Inventory, load_inventory, parse_inventory, resolve_inventory_path
from tests.lab.conftest import Lab, ping_from
from tests.support.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ADDRESSES = ["10.77.0.11", "10.77.0.12", "10.77.0.13"]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {d["name"] for d in json.loads(out or "[]")}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {d["ifname"] for d in json.loads(out)}


def _alive(pid: int) -> bool:
    """Running or stopped; a zombie has released everything and only waits for its parent (outside the lab)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _banner(address: str) -> bytes:
    with socket.create_connection((address, 22), timeout=5) as s:
        return s.recv(64)


def test_up_creates_three_namespaces_with_reachable_sshd(lab_2node: Lab) -> None:
    assert {"pl-lab-node1", "pl-lab-node2", "pl-lab-witness"} <= _namespaces()
    assert {"brpl", "vpl-lab-node1", "vpl-lab-node2", "vpl-lab-witness"} <= _links()
    for address in ADDRESSES:
        assert _banner(address).startswith(b"SSH-2.0-OpenSSH")
    key = lab_2node.key
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (key.parent.stat().st_mode & 0o777) == 0o700
    for node in lab_2node.nodes:
        res = lab_2node.ssh(node.address, "hostname -I")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [node.address]


def test_status_json_reports_every_node_up(lab_2node: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["PAYCTL_HOME"] = str(lab_2node.home)
    try:
        assert run(["lab", "status", "-i", "lab-2node", "--json"]) == 0
    finally:
        del os.environ["PAYCTL_HOME"]
    rows = json.loads(capsys.readouterr().out)
    assert [(r["node"], r["address"], r["up"]) for r in rows] == [
        ("node1", "10.77.0.11", True),
        ("node2", "10.77.0.12", True),
        ("witness", "10.77.0.13", True),
    ]
    assert all(r["sshd_pid"] for r in rows)


def test_hosts_reach_each_other_and_the_root_namespace_and_nothing_else(lab_2node: Lab) -> None:
    assert ping_from("pl-lab-node1", "10.77.0.12")
    assert ping_from("pl-lab-node2", "10.77.0.13")
    assert ping_from("pl-lab-witness", "10.77.0.11")
    assert ping_from("pl-lab-node1", "10.77.0.1")
    assert not ping_from("pl-lab-node1", "10.77.0.99")  # nobody there: the check can fail
    # No route out of the lab: the kernel refuses before any packet leaves (nothing is contacted).
    res = subprocess.run(["ip", "-n", "pl-lab-node1", "route", "get", "192.0.2.1"], capture_output=True, text=True)
    assert res.returncode != 0 and "unreachable" in res.stderr


def test_process_started_over_ssh_lands_in_the_node_cgroup_with_its_limits(lab_2node: Lab) -> None:
    res = lab_2node.ssh("10.77.0.13", "sleep 120 >/dev/null 2>&1 & echo $!")
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.strip())
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert ":cpu:/payctl-lab/lab-witness\n" in cgroups
    assert ":memory:/payctl-lab/lab-witness\n" in cgroups
    cg = Path("/sys/fs/cgroup")
    for node, spec in zip(lab_2node.nodes, lab_2node.inventory.nodes, strict=True):
        quota = (cg / f"cpu/payctl-lab/lab-{node.node}/cpu.cfs_quota_us").read_text().strip()
        period = (cg / f"cpu/payctl-lab/lab-{node.node}/cpu.cfs_period_us").read_text().strip()
        limit = (cg / f"memory/payctl-lab/lab-{node.node}/memory.limit_in_bytes").read_text().strip()
        assert int(quota) / int(period) == spec.cpus
        assert int(limit) == int(spec.memory_gb * 2**30)
    assert str(pid) in subprocess.run(["ip", "netns", "pids", "pl-lab-witness"], capture_output=True, text=True).stdout


def test_up_again_changes_nothing_and_restarts_nothing(lab_2node: Lab) -> None:
    assert len(lab_2node.up_steps) > 40  # the fixture's up did the work
    before = {n.node: n.pid_file.read_text() for n in lab_2node.nodes}
    assert lab.lab_up(lab_2node.inventory, lab_2node.home) == []
    # lab-1node is the same deployment and the same node1: already served
    assert lab.lab_up(load_inventory("lab-1node"), lab_2node.home) == []
    assert {n.node: n.pid_file.read_text() for n in lab_2node.nodes} == before


def test_cli_up_on_a_lab_that_is_up_says_so(lab_2node: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["PAYCTL_HOME"] = str(lab_2node.home)
    try:
        assert run(["lab", "up", "-i", "lab-1node"]) == 0
    finally:
        del os.environ["PAYCTL_HOME"]
    out = capsys.readouterr().out
    assert "already up: nothing changed" in out
    known = lab_2node.home / "lab" / "known_hosts"
    assert f"  node1: ssh -i {lab_2node.key} -o UserKnownHostsFile={known} root@10.77.0.11\n" in out


def test_up_repairs_what_is_missing(lab_2node: Lab) -> None:
    node2 = lab_2node.nodes[1]
    pid = int(node2.pid_file.read_text())
    os.kill(pid, 15)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5, "node2's sshd to exit")
    subprocess.run(["ip", "-n", node2.namespace, "link", "set", "lo", "down"], check=True)
    steps = lab.lab_up(lab_2node.inventory, lab_2node.home)
    assert [s.why for s in steps] == [
        "pl-lab-node2:lo up",
        "start sshd for node2 on 10.77.0.12:22",
        "wait for node2's sshd",
    ]
    assert _banner("10.77.0.12").startswith(b"SSH-2.0")


# ------------------------------------------------------------------------------------ pyinfra over SSH (hosts.py)


def _inventory_with_jump(tmp_path: Path, key: str | None = None) -> Inventory:
    data = yaml.safe_load(resolve_inventory_path("lab-2node").read_text())
    data["nodes"][1]["via"] = "node1"
    if key is not None:
        for n in data["nodes"]:
            n["ssh"]["key"] = key
    return parse_inventory(data, str(tmp_path / "lab-2node-via.yml"))


def test_pyinfra_runs_operations_on_every_node_and_reaches_node2_through_node1(lab_2node: Lab, tmp_path: Path) -> None:
    inv = _inventory_with_jump(tmp_path)
    node2_log = lab_2node.nodes[1].sshd_log
    log_before = node2_log.read_text()
    dests = {n.node: n.prefix / "pyinfra-test" / "hello.txt" for n in lab_2node.nodes}
    with hosts.connect(inv, lab_2node.home) as conn:
        assert conn.targets["node2"].via == "node1"
        for node, dest in dests.items():
            conn.add_op(files.directory, path=str(dest.parent), mode="755", nodes=[node])
            conn.add_op(files.put, src=io.StringIO(f"hello from {node}\n"), dest=str(dest), nodes=[node])
        shell = conn.add_op(server.shell, commands=["ip -4 -o addr show eth0 | awk '{print $4}'"])
        conn.run()
        out = {h.name: m.stdout.strip() for h, m in shell.items()}
    assert out == {"node1": "10.77.0.11/24", "node2": "10.77.0.12/24", "witness": "10.77.0.13/24"}
    for node, dest in dests.items():
        assert dest.read_text() == f"hello from {node}\n"
    # node2's sshd saw the session come from node1 (the jump host), not from the root namespace
    new_log = node2_log.read_text()[len(log_before) :]
    assert "Accepted publickey for root from 10.77.0.11 " in new_log
    assert "from 10.77.0.1 " not in new_log

    with hosts.connect(inv, lab_2node.home) as conn:
        metas = [
            conn.add_op(files.put, src=io.StringIO(f"hello from {node}\n"), dest=str(dest), nodes=[node])
            for node, dest in dests.items()
        ]
        conn.run()
    assert [m.did_change() for d in metas for m in d.values()] == [False, False, False]


def test_failed_operation_names_the_node_and_the_output(lab_2node: Lab, tmp_path: Path) -> None:
    inv = _inventory_with_jump(tmp_path)
    with hosts.connect(inv, lab_2node.home, nodes=["witness"]) as conn:
        conn.add_op(server.shell, commands=["echo boom-output >&2; exit 3"])
        with pytest.raises(DeployError) as err:
            conn.run()
    assert "witness: operation server.shell failed: boom-output" in err.value.message


def test_wrong_key_is_a_deploy_error_naming_the_host(lab_2node: Lab, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    inv = _inventory_with_jump(tmp_path, key=str(wrong))
    with pytest.raises(DeployError) as err, hosts.connect(inv, lab_2node.home, nodes=["witness"]):
        pass
    assert err.value.message.startswith("cannot connect to witness (root@10.77.0.13:22): Authentication error")
    assert "ssh.key" in err.value.hint
    # through the jump host, the jump host rejecting the key is named too
    with pytest.raises(DeployError) as err, hosts.connect(inv, lab_2node.home, nodes=["node2"]):
        pass
    assert "jump host node1 (root@10.77.0.11:22) rejected key" in err.value.message
    missing = _inventory_with_jump(tmp_path, key=str(tmp_path / "nope"))
    expected = r"node1 \(root@10.77.0.11:22\): SSH key .*/nope does not exist"
    with pytest.raises(DeployError, match=expected), hosts.connect(missing, lab_2node.home, nodes=["node1"]):
        pass


def test_unreachable_host_is_a_deploy_error_naming_it(lab_2node: Lab, tmp_path: Path) -> None:
    data = yaml.safe_load(resolve_inventory_path("lab-1node").read_text())
    data["nodes"][0]["private_address"] = "10.77.0.99"  # inside the lab network, no namespace holds it
    inv = parse_inventory(data)
    # the attempt must stay on the lab bridge (never leave the machine by the default route)
    route = subprocess.run(["ip", "route", "get", "10.77.0.99"], capture_output=True, text=True, check=True).stdout
    assert " dev brpl " in route
    with pytest.raises(DeployError) as err, hosts.connect(inv, lab_2node.home, timeout=2):
        pass
    assert err.value.message.startswith("cannot connect to node1 (root@10.77.0.99:22): ")
    assert "sshd runs" in err.value.hint


def test_connection_errors_print_nothing_outside_pytest(lab_2node: Lab, tmp_path: Path) -> None:
    """The core never prints: pyinfra's and paramiko's log records must not reach stderr (pytest's own log
    capture would hide them, so this runs in a plain interpreter)."""
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    script = f"""
import yaml
from pathlib import Path
from payctl import hosts
from payctl.errors import DeployError
from payctl.inventory import parse_inventory, resolve_inventory_path
data = yaml.safe_load(resolve_inventory_path("lab-1node").read_text())
data["nodes"][0]["ssh"]["key"] = {str(wrong)!r}
try:
    with hosts.connect(parse_inventory(data), Path({str(lab_2node.home)!r})):
        pass
except DeployError as exc:
    print(exc.message)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith("cannot connect to node1 (root@10.77.0.11:22): Authentication error")
    assert res.stderr == ""


def test_a_regenerated_host_key_is_served_and_trusted_in_the_same_process(lab_2node: Lab, tmp_path: Path) -> None:
    """Earlier tests connected to the witness from this process; its host key changes: lab up reloads sshd and
    rewrites known_hosts, and the connection layer must not keep trusting the key it had cached."""
    witness = lab_2node.nodes[2]
    old_key = witness.host_key.with_name(witness.host_key.name + ".pub").read_text()
    pid = int(witness.pid_file.read_text())
    for f in (witness.host_key, witness.host_key.with_name(witness.host_key.name + ".pub")):
        f.unlink()
    steps = [s.why for s in lab.lab_up(lab_2node.inventory, lab_2node.home)]
    assert steps[0] == "witness host key"
    assert f"reload witness's sshd (pid {pid})" in steps
    new_key = witness.host_key.with_name(witness.host_key.name + ".pub").read_text()
    assert new_key != old_key
    assert new_key.split()[1] in (lab_2node.home / "lab" / "known_hosts").read_text()
    wait_until(lambda: lab_2node.ssh(witness.address, "true").returncode == 0, 5, "the witness to serve its new key")
    with hosts.connect(_inventory_with_jump(tmp_path), lab_2node.home, nodes=["witness"]) as conn:
        shell = conn.add_op(server.shell, commands=["echo ok"])
        conn.run()
    assert [m.stdout for m in shell.values()] == ["ok"]
    assert int(witness.pid_file.read_text()) == pid  # reloaded, not restarted


# ----------------------------------------------------------------------------------------------- down (runs last)


def test_down_removes_only_the_lab(lab_2node: Lab) -> None:
    pids = set()
    for node in lab_2node.nodes:
        out = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True, check=True)
        pids |= {int(p) for p in out.stdout.split()}
    stubborn = lab_2node.ssh("10.77.0.12", "nohup sh -c 'trap \"\" TERM; sleep 120' >/dev/null 2>&1 & echo $!")
    assert stubborn.returncode == 0, stubborn.stderr
    pids.add(int(stubborn.stdout))
    assert len(pids) >= 5  # three sshds, the sleep started over SSH and the TERM-ignoring shell
    started: dict[str, float] = {}
    steps = lab.lab_down(
        lab_2node.inventory,
        lab_2node.home,
        progress=lambda step: started.setdefault(step.why, time.monotonic()),
        stop_timeout=1.0,
    )
    # the shell ignoring SIGTERM got SIGKILL at the 1 s deadline (the default deadline is 10 s)
    stop_node2 = started["remove vpl-lab-node2"] - started["stop node2's processes"]
    assert 1.0 <= stop_node2 < 8
    assert steps
    assert lab_2node.bystander in _namespaces()
    assert not {n for n in _namespaces() if n.startswith("pl-lab-")}
    assert not {ln for ln in _links() if ln == "brpl" or ln.startswith("vpl-lab-")}
    assert not [p for p in pids if _alive(p)]
    for sub in ("cpu", "memory"):
        assert not Path(f"/sys/fs/cgroup/{sub}/payctl-lab").exists()
    for node in lab_2node.nodes:
        assert not node.prefix.exists()
    assert not lab_2node.nodes[0].prefix.parent.exists()  # /var/lib/payctl-lab held only the lab's prefixes
    assert lab.lab_down(lab_2node.inventory, lab_2node.home) == []
