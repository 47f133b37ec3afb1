"""Lab and connection-layer logic that needs no root: names, commands as data, plans, errors, dry-run hosts."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pyinfra.operations import files, server

from payctl import hosts, lab
from payctl.cli import run
from payctl.errors import ConfigError, DeployError, PayctlError
from payctl.inventory import Inventory, load_inventory, parse_inventory, resolve_inventory_path

V1 = lab.Cgroups(1, Path("/cg"))
V2 = lab.Cgroups(2, Path("/cg2"))


def _inv(name: str = "lab-2node", **changes: object) -> Inventory:
    data = yaml.safe_load(resolve_inventory_path(name).read_text())
    data.update(changes)
    return parse_inventory(data)


def test_layout_names_and_paths() -> None:
    inv = load_inventory("lab-2node")
    nodes = lab.layout(inv)
    n1, n2, w = nodes
    assert [n.namespace for n in nodes] == ["pl-lab-node1", "pl-lab-node2", "pl-lab-witness"]
    assert [n.veth for n in nodes] == ["vpl-lab-node1", "vpl-lab-node2", "vpl-lab-witness"]
    assert [n.address for n in nodes] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert n1.prefix == Path(inv.node_prefix("node1"))
    assert n1.cgroup == "payctl-lab/lab-node1"
    assert n1.sshd_config == n1.prefix / "ssh" / "sshd_config"
    spec = inv.node("witness")
    assert (w.cpus, w.memory_bytes) == (spec.cpus, int(spec.memory_gb * 2**30))
    assert n2.node == "node2"


def test_long_names_get_a_stable_hashed_veth_within_15_characters() -> None:
    data = yaml.safe_load(resolve_inventory_path("lab-1node").read_text())
    data["deployment"] = "a-rather-long-deployment"
    (node,) = lab.layout(parse_inventory(data))
    assert len(node.veth) == 15 and node.veth.startswith("vpl")
    assert node.veth == lab.layout(parse_inventory(data))[0].veth
    assert node.namespace == "pl-a-rather-long-deployment-node1"


def test_only_lab_network_addresses_are_accepted() -> None:
    with pytest.raises(ConfigError) as err:
        lab.layout(load_inventory("ktcloud-2node"))
    assert "nodes[0].private_address: 198.51.100.11 is outside the lab network 10.77.0.0/24" in err.value.problems[0]
    data = yaml.safe_load(resolve_inventory_path("lab-1node").read_text())
    data["nodes"][0]["private_address"] = "10.77.0.1"
    with pytest.raises(ConfigError) as err:
        lab.layout(parse_inventory(data))
    assert "10.77.0.1 is the bridge" in err.value.problems[0]


def test_nodes_sharing_a_prefix_are_refused() -> None:
    data = yaml.safe_load(resolve_inventory_path("lab-2node").read_text())
    for n in data["nodes"]:
        n.pop("prefix", None)
    with pytest.raises(ConfigError) as err:
        lab.layout(parse_inventory(data))
    assert any("is also node1's" in p for p in err.value.problems)


def test_sshd_config_has_every_setting_the_lab_needs() -> None:
    (node,) = lab.layout(load_inventory("lab-1node"))
    text = lab.render_sshd_config(node)
    for line in (
        "ListenAddress 10.77.0.11",
        f"HostKey {node.host_key}",
        f"PidFile {node.pid_file}",
        f"AuthorizedKeysFile {node.authorized_keys}",
        "PasswordAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",
        "Subsystem sftp internal-sftp",
    ):
        assert f"\n{line}\n" in text


def test_sshd_starts_inside_the_cgroups_then_the_namespace() -> None:
    (node,) = lab.layout(load_inventory("lab-1node"))
    argv = lab.start_sshd_argv(node, V1)
    sep = argv.index("--")
    assert argv[4:sep] == (
        "/cg/cpu/payctl-lab/lab-node1/cgroup.procs",
        "/cg/memory/payctl-lab/lab-node1/cgroup.procs",
    )
    assert argv[sep + 1 :] == (
        "ip", "netns", "exec", "pl-lab-node1", "/usr/sbin/sshd", "-f", str(node.sshd_config), "-E", str(node.sshd_log),
    )  # fmt: skip
    assert lab.start_sshd_argv(node, V2)[4 : sep - 1] == ("/cg2/payctl-lab/lab-node1/cgroup.procs",)


def test_cgroup_limits_v1_and_v2() -> None:
    assert V1.limits("payctl-lab/x", 0.5, 2**29) == {
        Path("/cg/cpu/payctl-lab/x/cpu.cfs_period_us"): "100000",
        Path("/cg/cpu/payctl-lab/x/cpu.cfs_quota_us"): "50000",
        Path("/cg/memory/payctl-lab/x/memory.limit_in_bytes"): str(2**29),
    }
    assert V2.limits("payctl-lab/x", 1.5, 2**30) == {
        Path("/cg2/payctl-lab/x/cpu.max"): "150000 100000",
        Path("/cg2/payctl-lab/x/memory.max"): str(2**30),
    }
    assert V2.enable_controllers() == {
        Path("/cg2/cgroup.subtree_control"): "+cpu +memory",
        Path("/cg2/payctl-lab/cgroup.subtree_control"): "+cpu +memory",
    }
    assert V1.enable_controllers() == {}


def test_plan_up_enables_v2_controllers_only_where_missing(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-1node"))
    root_ctl, lab_ctl = V2.enable_controllers()
    state = replace(_empty_state(nodes), controllers_missing=frozenset({lab_ctl}))
    writes = [s for s in lab.plan_up(nodes, tmp_path, state, V2) if isinstance(s, lab.WriteFile)]
    assert (writes[0].path, writes[0].text) == (lab_ctl, "+cpu +memory")
    assert root_ctl not in [w.path for w in writes]
    assert [w.path.name for w in writes[1:3]] == ["cpu.max", "memory.max"]


def test_detect_cgroups(tmp_path: Path) -> None:
    with pytest.raises(PayctlError, match="no usable cgroups"):
        lab.detect_cgroups(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert lab.detect_cgroups(tmp_path) == lab.Cgroups(2, tmp_path)


def _empty_state(nodes: list[lab.NodeLayout]) -> lab.LabState:
    return lab.LabState(nodes={n.node: lab.NodeState() for n in nodes})


def _up_state(nodes: list[lab.NodeLayout], home: Path) -> lab.LabState:
    node_states = {}
    for n in nodes:
        node_states[n.node] = lab.NodeState(
            namespace=True, veth=True, veth_master="brpl", veth_up=True, eth0=True, eth0_up=True,
            eth0_addresses=frozenset({f"{n.address}/24"}), lo_up=True, marker=True, owner=str(home.absolute()),
            ssh_dir=True, host_key=True, host_public_key=None, sshd_config=lab.render_sshd_config(n),
            authorized_keys="ssh-ed25519 AAAA lab\n",
            cgroup_dirs=frozenset(V1.dirs(n.cgroup)), cgroup_limits=V1.limits(n.cgroup, n.cpus, n.memory_bytes),
            sshd_pid=4242, pids=(4242,),
        )  # fmt: skip
    return lab.LabState(
        bridge=True, bridge_up=True, bridge_addresses=frozenset({"10.77.0.1/24"}),
        bridge_members=frozenset(n.veth for n in nodes), privsep_dir=True, client_key=True,
        client_public_key="ssh-ed25519 AAAA lab\n", cgroup_parent_children=frozenset(n.cgroup for n in nodes),
        nodes=node_states,
    )  # fmt: skip


def test_plan_up_from_nothing_builds_everything_in_order(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-1node"))
    steps = lab.plan_up(nodes, tmp_path, _empty_state(nodes), V1)
    runs = [s.argv for s in steps if isinstance(s, lab.Run)]
    assert runs[:3] == [
        ("ip", "link", "add", "brpl", "type", "bridge"),
        ("ip", "addr", "add", "10.77.0.1/24", "dev", "brpl"),
        ("ip", "link", "set", "brpl", "up"),
    ]
    assert runs[3:10] == [
        ("ip", "netns", "add", "pl-lab-node1"),
        ("ip", "link", "add", "vpl-lab-node1", "type", "veth", "peer", "name", "eth0", "netns", "pl-lab-node1"),
        ("ip", "link", "set", "vpl-lab-node1", "master", "brpl"),
        ("ip", "link", "set", "vpl-lab-node1", "up"),
        ("ip", "-n", "pl-lab-node1", "addr", "add", "10.77.0.11/24", "dev", "eth0"),
        ("ip", "-n", "pl-lab-node1", "link", "set", "eth0", "up"),
        ("ip", "-n", "pl-lab-node1", "link", "set", "lo", "up"),
    ]
    assert runs[10] == lab.start_sshd_argv(nodes[0], V1)
    assert isinstance(steps[-1], lab.WaitSshd)
    # every address configured is the bridge's or a node's, all inside 10.77.0.0/24
    addrs = [a[a.index("add") + 1] for a in runs if "addr" in a]
    assert addrs == ["10.77.0.1/24", "10.77.0.11/24"]


def test_plan_up_for_a_lab_that_is_up_is_empty(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-2node"))
    assert lab.plan_up(nodes, tmp_path, _up_state(nodes, tmp_path), V1) == []
    assert lab.plan_keys(nodes, tmp_path, _up_state(nodes, tmp_path)) == []


def test_plan_up_reloads_sshd_on_a_new_config_instead_of_restarting(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-1node"))
    state = _up_state(nodes, tmp_path)
    stale = replace(state.nodes["node1"], sshd_config="old\n")
    steps = lab.plan_up(nodes, tmp_path, replace(state, nodes={"node1": stale}), V1)
    assert [s.why for s in steps] == [f"write {nodes[0].sshd_config}", "reload node1's sshd (pid 4242)"]
    assert isinstance(steps[1], lab.Run) and steps[1].argv == ("kill", "-HUP", "4242")


def test_plan_down_keeps_the_bridge_and_parent_cgroup_for_other_lab_nodes(tmp_path: Path) -> None:
    two = lab.layout(load_inventory("lab-2node"))
    state = _up_state(two, tmp_path)
    one = two[:1]
    steps = lab.plan_down(one, tmp_path, replace(state, nodes={"node1": state.nodes["node1"]}), V1)
    whys = [s.why for s in steps]
    assert whys == [
        "stop node1's processes",
        "remove vpl-lab-node1",
        "remove namespace pl-lab-node1",
        "remove cgroup /cg/cpu/payctl-lab/lab-node1",
        "remove cgroup /cg/memory/payctl-lab/lab-node1",
        f"remove prefix {one[0].prefix}",
    ]
    all_steps = lab.plan_down(two, tmp_path, state, V1)
    assert any(isinstance(s, lab.Run) and s.argv == ("ip", "link", "del", "brpl") for s in all_steps)


def test_plan_down_never_touches_a_prefix_without_the_marker(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-1node"))
    state = _up_state(nodes, tmp_path)
    unmarked = replace(state, nodes={"node1": replace(state.nodes["node1"], marker=False)})
    assert not [s for s in lab.plan_down(nodes, tmp_path, unmarked, V1) if isinstance(s, lab.RemoveTree)]
    with pytest.raises(DeployError, match=r"no \.payctl-lab marker"):
        lab.execute([lab.RemoveTree(tmp_path, "x")], lab.run_command)


def test_a_prefix_with_foreign_content_is_never_adopted(tmp_path: Path) -> None:
    nodes = lab.layout(load_inventory("lab-1node"))
    state = _empty_state(nodes)
    foreign = replace(state, nodes={"node1": replace(state.nodes["node1"], prefix_foreign=True)})
    with pytest.raises(PayctlError, match=f"prefix {nodes[0].prefix} already exists with content"):
        lab.plan_keys(nodes, tmp_path, foreign)


def test_lab_hosts_made_from_another_home_are_refused_unless_forced(tmp_path: Path) -> None:
    """A lab left up by another PAYCTL_HOME holds that home's deployment: adopting it would run with the wrong
    secrets, so up refuses, and down refuses to delete its data without --force."""
    nodes = lab.layout(load_inventory("lab-1node"))
    state = _up_state(nodes, tmp_path / "other")
    with pytest.raises(PayctlError) as err:
        lab.plan_keys(nodes, tmp_path, state)
    assert f"node1 ({nodes[0].prefix}) belongs to PAYCTL_HOME={tmp_path / 'other'}" in err.value.message
    assert "payctl lab down --force" in (err.value.hint or "")
    with pytest.raises(PayctlError, match="another PAYCTL_HOME"):
        lab.plan_down(nodes, tmp_path, state, V1)
    forced = lab.plan_down(nodes, tmp_path, state, V1, force=True)
    assert f"remove prefix {nodes[0].prefix}" in [s.why for s in forced]
    old = replace(state, nodes={"node1": replace(state.nodes["node1"], owner=None)})  # marker from before homes
    with pytest.raises(PayctlError, match="another PAYCTL_HOME"):
        lab.plan_keys(nodes, tmp_path, old)


def test_marker_records_the_home_and_is_read_back(tmp_path: Path) -> None:
    node = lab.layout(load_inventory("lab-1node"))[0]
    text = lab._marker_text(node, tmp_path)
    assert lab._marker_owner(node, text) == (True, str(tmp_path))
    assert lab._marker_owner(node, "pl-lab-node1\n") == (True, None)
    assert lab._marker_owner(node, "pl-lab-node2\nhome: /x\n") == (False, None)
    assert lab._marker_owner(node, None) == (False, None)


def test_runner_raises_deploy_error_naming_command_and_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(DeployError) as err:
        lab.run_command(["ls", str(missing)])
    assert err.value.message.startswith(f"`ls {missing}` failed (exit 2): ls: cannot access")
    with pytest.raises(DeployError, match="no-such-binary-xyz is not installed"):
        lab.run_command(["no-such-binary-xyz"])
    assert lab.run_command(["true"]).returncode == 0


def test_lab_commands_need_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert run(["lab", "up", "-i", "lab-2node"]) == 1
    err = capsys.readouterr().err
    assert "error: payctl lab up needs root (it creates network namespaces, links and cgroups)" in err
    assert "hint: run it as root, e.g. `sudo payctl lab up -i inventories/lab-2node.yml`" in err


def test_lab_up_on_a_non_lab_inventory_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["lab", "up", "-i", "ktcloud-1node"]) == 2
    assert "this inventory cannot be a lab" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- hosts, no network


def test_targets_use_public_address_or_private_through_the_jump_host(tmp_path: Path) -> None:
    inv = load_inventory("ktcloud-2node")
    t = hosts.targets(inv, tmp_path)
    assert (t["node1"].address, t["node1"].via, t["node1"].key) == ("203.0.113.10", None, tmp_path / "keys/ktcloud-pay")
    assert (t["node2"].address, t["node2"].via) == ("198.51.100.12", "node1")
    assert t["node2"].jump is not None and t["node2"].jump.address == "203.0.113.10"
    assert t["witness"].describe() == "witness (root@198.51.100.13:22 via node1)"
    assert not hosts.is_lab(inv)
    assert hosts.is_lab(load_inventory("lab-2node"))
    assert hosts.use_fake(inv, dry_run=True)
    assert not hosts.use_fake(inv, dry_run=False)
    assert not hosts.use_fake(load_inventory("lab-2node"), dry_run=True)


def test_fake_connection_runs_operations_without_contacting_anyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    inv = load_inventory("ktcloud-2node")  # its key file does not exist: dry runs must not need it
    with hosts.connect(inv, tmp_path, fake=True) as conn:
        assert set(conn.hosts) == {"node1", "node2", "witness"}
        d = conn.add_op(files.directory, path="/opt/payctl/x")
        s = conn.add_op(server.shell, commands=["echo hi"], nodes=["node2"])
        conn.run()
    assert all(m.did_succeed() for m in d.values())
    assert [h.name for h in s] == ["@fake/node2"]


def test_missing_key_for_a_real_connection_names_the_node(tmp_path: Path) -> None:
    with pytest.raises(DeployError) as err, hosts.connect(load_inventory("ktcloud-1node"), tmp_path):
        pass
    assert err.value.message == (
        f"cannot connect to node node1 (root@203.0.113.10:22): SSH key {tmp_path}/keys/ktcloud-pay does not exist"
    )
