"""Lab hosts: one network namespace per inventory node on this machine, each with its own sshd, prefix and cgroup.

    root namespace                          pl-<deployment>-<node> (one per node)
    brpl 10.77.0.1/24 ── vpl-…-node1 ══════ eth0 10.77.0.11/24, lo
                      ── vpl-…-node2 ══════ eth0 10.77.0.12/24, lo        sshd -f <prefix>/ssh/sshd_config
                      ── vpl-…-witness ════ eth0 10.77.0.13/24, lo        in cgroup payctl-lab/<deployment>-<node>

Hosts reach each other and the root namespace through the bridge and nothing else (no default route). Namespaces share
the filesystem and the process table, so every node keeps its files under its own prefix directory, and the cgroup
(cpu quota and memory limit from the inventory's sizes) is what makes a node as big as the inventory says: sshd is
started inside it, so everything started over SSH inherits it.

The work is data first: ``observe`` reads the machine into a ``LabState``, ``plan_up``/``plan_down`` turn layout +
state into ``Step`` values (argv lists, file writes, directory changes), and ``execute`` applies them through one
runner that raises ``DeployError`` naming the command and its stderr. ``lab_up`` run twice plans nothing the second
time. Only 10.77.0.0/24 is ever configured; nothing here opens a connection.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

from payctl.errors import ConfigError, DeployError, PayctlError
from payctl.secrets import DIR_MODE, known_hosts_path

BRIDGE: Final = "brpl"
BRIDGE_ADDRESS: Final = "10.77.0.1"
LAB_NETWORK: Final = ipaddress.IPv4Network("10.77.0.0/24")
SSH_PORT: Final = 22
CGROUP_PARENT: Final = "payctl-lab"
CPU_PERIOD_US: Final = 100_000
MARKER: Final = ".payctl-lab"
SSHD: Final = "/usr/sbin/sshd"
LOCK_FILE: Final = Path("/run/payctl-lab.lock")
_IFNAME_MAX: Final = 15
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LabNode(Protocol):
    """What the lab needs from an inventory node (payctl.inventory's node model satisfies it)."""

    @property
    def name(self) -> str: ...

    @property
    def private_address(self) -> object: ...  # str or ipaddress.IPv4Address

    @property
    def cpus(self) -> float: ...

    @property
    def memory_gb(self) -> float: ...


class LabInventory(Protocol):
    @property
    def deployment(self) -> str: ...

    @property
    def nodes(self) -> Sequence[LabNode]: ...

    def node_prefix(self, name: str) -> str:
        """The node's own prefix, else the inventory's."""
        ...


# ---------------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Cgroups:
    """Where cgroups live and which version: v1 (one hierarchy per controller) or v2 (unified)."""

    version: int
    root: Path = Path("/sys/fs/cgroup")

    def dirs(self, group: str) -> tuple[Path, ...]:
        if self.version == 2:
            return (self.root / group,)
        return (self.root / "cpu" / group, self.root / "memory" / group)

    def limits(self, group: str, cpus: float, memory_bytes: int) -> dict[Path, str]:
        quota = max(1000, round(cpus * CPU_PERIOD_US))
        if self.version == 2:
            d = self.root / group
            return {d / "cpu.max": f"{quota} {CPU_PERIOD_US}", d / "memory.max": str(memory_bytes)}
        cpu, mem = self.dirs(group)
        return {
            cpu / "cpu.cfs_period_us": str(CPU_PERIOD_US),
            cpu / "cpu.cfs_quota_us": str(quota),
            mem / "memory.limit_in_bytes": str(memory_bytes),
        }

    def procs_files(self, group: str) -> tuple[Path, ...]:
        return tuple(d / "cgroup.procs" for d in self.dirs(group))

    def parents(self) -> tuple[Path, ...]:
        return self.dirs(CGROUP_PARENT)

    def enable_controllers(self) -> dict[Path, str]:
        """v2 only: controllers a child needs enabled in every ancestor's subtree_control."""
        if self.version != 2:
            return {}
        return {
            self.root / "cgroup.subtree_control": "+cpu +memory",
            self.root / CGROUP_PARENT / "cgroup.subtree_control": "+cpu +memory",
        }


def detect_cgroups(root: Path = Path("/sys/fs/cgroup")) -> Cgroups:
    if (root / "cgroup.controllers").exists():
        return Cgroups(2, root)
    if (root / "cpu" / "cgroup.procs").exists() and (root / "memory" / "cgroup.procs").exists():
        return Cgroups(1, root)
    raise PayctlError(
        f"no usable cgroups under {root} (need cgroup v2, or v1 with the cpu and memory controllers)",
        hint="lab hosts take their CPU and memory limits from cgroups; mount them or run the lab on a Linux VM",
    )


@dataclass(frozen=True)
class NodeLayout:
    """Every name and path of one lab node, derived from the inventory (pure, no I/O)."""

    deployment: str
    node: str
    address: str
    prefix: Path
    cpus: float
    memory_bytes: int

    @property
    def namespace(self) -> str:
        return f"pl-{self.deployment}-{self.node}"

    @property
    def veth(self) -> str:
        """Host side of the node's veth pair; Linux interface names are at most 15 characters."""
        name = f"vpl-{self.deployment}-{self.node}"
        if len(name) <= _IFNAME_MAX:
            return name
        return "vpl" + hashlib.sha1(self.namespace.encode()).hexdigest()[: _IFNAME_MAX - 3]

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_PARENT}/{self.deployment}-{self.node}"

    @property
    def ssh_dir(self) -> Path:
        return self.prefix / "ssh"

    @property
    def sshd_config(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def pid_file(self) -> Path:
        return self.ssh_dir / "sshd.pid"

    @property
    def sshd_log(self) -> Path:
        return self.ssh_dir / "sshd.log"


def client_key_path(home: Path) -> Path:
    """The lab's SSH key pair (the lab inventories say ``key: lab/id_ed25519``, relative to PAYCTL_HOME)."""
    return home / "lab" / "id_ed25519"


def layout(inventory: LabInventory) -> list[NodeLayout]:
    """Derive and check every node's names; only addresses inside 10.77.0.0/24 are accepted."""
    problems: list[str] = []
    deployment = inventory.deployment
    if not _NAME_RE.match(deployment):
        problems.append(f"deployment: {deployment!r} cannot name a network namespace")
    nodes: list[NodeLayout] = []
    seen: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    for i, node in enumerate(inventory.nodes):
        where = f"nodes[{i}]"
        if not _NAME_RE.match(node.name):
            problems.append(f"{where}.name: {node.name!r} cannot name a network namespace")
        try:
            addr = ipaddress.IPv4Address(str(node.private_address))
        except ValueError:
            problems.append(f"{where}.private_address: {node.private_address!r} is not an IPv4 address")
            continue
        usable = addr in LAB_NETWORK and addr not in (
            LAB_NETWORK.network_address,
            LAB_NETWORK.broadcast_address,
            ipaddress.IPv4Address(BRIDGE_ADDRESS),
        )
        if not usable:
            problems.append(
                f"{where}.private_address: {addr} is outside the lab network {LAB_NETWORK} (or reserved: "
                f"{BRIDGE_ADDRESS} is the bridge)"
            )
        if str(addr) in seen:
            problems.append(f"{where}.private_address: {addr} is also {seen[str(addr)]}'s")
        seen[str(addr)] = node.name
        prefix = Path(inventory.node_prefix(node.name))
        if not prefix.is_absolute() or len(prefix.parts) < 3:
            problems.append(f"{where}.prefix: {prefix} must be an absolute path at least two levels deep")
        elif str(prefix) in prefixes:
            problems.append(
                f"{where}.prefix: {prefix} is also {prefixes[str(prefix)]}'s (lab hosts share one "
                "filesystem: give each node its own prefix)"
            )
        prefixes[str(prefix)] = node.name
        if node.cpus <= 0 or node.memory_gb <= 0:
            problems.append(f"{where}: cpus and memory_gb must be > 0 for a lab cgroup")
        nodes.append(
            NodeLayout(deployment, node.name, str(addr), prefix, float(node.cpus), int(node.memory_gb * 2**30))
        )
    if problems:
        raise ConfigError(
            "this inventory cannot be a lab",
            hint="lab inventories put every node in 10.77.0.0/24 with its own prefix (see docs/lab.md)",
            problems=problems,
        )
    return nodes


def _marker_text(node: NodeLayout, home: Path) -> str:
    """The marker names the node's namespace and the PAYCTL_HOME that made it (its secrets and SSH key live there)."""
    return f"{node.namespace}\nhome: {home.absolute()}\n"


def _marker_owner(node: NodeLayout, text: str | None) -> tuple[bool, str | None]:
    """(is this node's marker, the home recorded in it; None for a marker written before homes were recorded)."""
    if text is None:
        return False, None
    lines = text.splitlines()
    if not lines or lines[0] != node.namespace:
        return False, None
    homes = [line.removeprefix("home: ") for line in lines[1:] if line.startswith("home: ")]
    return True, (homes[0] if homes else None)


def _foreign_owners(nodes: Sequence[NodeLayout], home: Path, state: LabState) -> list[str]:
    mine = str(home.absolute())
    return [
        f"{n.node} ({n.prefix}) belongs to PAYCTL_HOME={state.nodes[n.node].owner or 'unknown (an older payctl)'}"
        for n in nodes
        if state.nodes[n.node].marker and state.nodes[n.node].owner != mine
    ]


def _owned_elsewhere(problems: list[str]) -> PayctlError:
    return DeployError(
        f"lab hosts made from another PAYCTL_HOME (their secrets and SSH key live there): {'; '.join(problems)}",
        hint="tear them down from that home (`PAYCTL_HOME=<that home> payctl lab down -i INV`), or remove them with "
        "their data: `payctl lab down --force -i INV`",
    )


def render_sshd_config(node: NodeLayout) -> str:
    return (
        f"# payctl lab host {node.node} of deployment {node.deployment} (namespace {node.namespace})\n"
        f"ListenAddress {node.address}\n"
        f"Port {SSH_PORT}\n"
        f"HostKey {node.host_key}\n"
        f"PidFile {node.pid_file}\n"
        f"AuthorizedKeysFile {node.authorized_keys}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PrintMotd no\n"
        "Subsystem sftp internal-sftp\n"
    )


# ------------------------------------------------------------------------------------------------------ steps (data)


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class WriteFile:
    path: Path
    text: str
    why: str
    mode: int | None = 0o644  # None: write in place (cgroup control files)


@dataclass(frozen=True)
class MakeDir:
    path: Path
    why: str
    mode: int = 0o755


@dataclass(frozen=True)
class RemoveDir:
    """rmdir (cgroups): retried while the kernel still lists exiting tasks."""

    path: Path
    why: str


@dataclass(frozen=True)
class RemoveTree:
    """rm -r of a lab prefix; refused unless it holds the lab's marker file."""

    path: Path
    why: str


@dataclass(frozen=True)
class StopProcesses:
    """TERM every process in the namespace or cgroups, KILL what is left at the deadline."""

    namespace: str | None
    procs_files: tuple[Path, ...]
    why: str


@dataclass(frozen=True)
class WaitSshd:
    node: NodeLayout
    why: str


Step = Run | WriteFile | MakeDir | RemoveDir | RemoveTree | StopProcesses | WaitSshd


def start_sshd_argv(node: NodeLayout, cgroups: Cgroups) -> tuple[str, ...]:
    """sshd started by a shell that first moves itself into the node's cgroups, then execs into the namespace."""
    script = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
    procs = tuple(str(p) for p in cgroups.procs_files(node.cgroup))
    return (
        "sh", "-ec", script, "sh", *procs, "--",
        "ip", "netns", "exec", node.namespace, SSHD, "-f", str(node.sshd_config), "-E", str(node.sshd_log),
    )  # fmt: skip


def keygen_argv(path: Path, comment: str) -> tuple[str, ...]:
    return ("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


# --------------------------------------------------------------------------------------------------------- observe


@dataclass(frozen=True)
class NodeState:
    namespace: bool = False
    veth: bool = False
    veth_master: str | None = None
    veth_up: bool = False
    eth0: bool = False
    eth0_up: bool = False
    eth0_addresses: frozenset[str] = frozenset()
    lo_up: bool = False
    marker: bool = False  # the prefix holds this node's .payctl-lab marker
    owner: str | None = None  # the PAYCTL_HOME recorded in that marker
    prefix_foreign: bool = False  # the prefix exists with content but without this node's marker
    ssh_dir: bool = False
    host_key: bool = False
    host_public_key: str | None = None
    sshd_config: str | None = None
    authorized_keys: str | None = None
    cgroup_dirs: frozenset[Path] = frozenset()
    cgroup_limits: Mapping[Path, str] = field(default_factory=dict)
    sshd_pid: int | None = None
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LabState:
    bridge: bool = False
    bridge_up: bool = False
    bridge_addresses: frozenset[str] = frozenset()
    bridge_members: frozenset[str] = frozenset()
    privsep_dir: bool = False
    client_key: bool = False
    client_public_key: str | None = None
    cgroup_parent_children: frozenset[str] = frozenset()
    controllers_missing: frozenset[Path] = frozenset()  # v2 subtree_control files lacking cpu or memory
    nodes: Mapping[str, NodeState] = field(default_factory=dict)


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]: ...


def run_command(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The one place lab commands run. A failure is a DeployError naming the command and its stderr."""
    cmd = shlex.join(argv)
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise DeployError(
            f"`{cmd}` failed: {argv[0]} is not installed", hint="the lab needs iproute2 and openssh-server"
        ) from None
    except subprocess.TimeoutExpired:
        raise DeployError(f"`{cmd}` did not finish within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        stderr = proc.stderr.strip() or proc.stdout.strip() or "no output"
        raise DeployError(f"`{cmd}` failed (exit {proc.returncode}): {stderr}")
    return proc


def _ip_json(runner: Runner, *argv: str) -> list[dict[str, Any]]:
    out = runner(["ip", "-j", *argv]).stdout.strip()
    data = json.loads(out) if out else []
    return [d for d in data if isinstance(d, dict) and d]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _sshd_pid(node: NodeLayout, pids: Sequence[int]) -> int | None:
    text = _read(node.pid_file)
    if not text or not text.strip().isdigit():
        return None
    pid = int(text.strip())
    comm = _read(Path(f"/proc/{pid}/comm"))
    return pid if pid in pids and comm is not None and comm.strip() == "sshd" else None


def _ns_pids(runner: Runner, namespace: str) -> tuple[int, ...]:
    out = runner(["ip", "netns", "pids", namespace]).stdout
    return tuple(int(p) for p in out.split() if p.isdigit())


def _cgroup_pids(files: Sequence[Path]) -> set[int]:
    pids: set[int] = set()
    for f in files:
        text = _read(f) or ""
        pids.update(int(p) for p in text.split() if p.isdigit())
    return pids


def observe(nodes: Sequence[NodeLayout], home: Path, cgroups: Cgroups, runner: Runner) -> LabState:
    """Read everything the planners compare against; runs read-only commands only."""
    links = {d["ifname"]: d for d in _ip_json(runner, "addr", "show")}
    namespaces = {d.get("name") for d in _ip_json(runner, "netns", "list")}
    br = links.get(BRIDGE)
    states: dict[str, NodeState] = {}
    for node in nodes:
        veth = links.get(node.veth)
        ns_present = node.namespace in namespaces
        ns_links = (
            {d["ifname"]: d for d in _ip_json(runner, "-n", node.namespace, "addr", "show")} if ns_present else {}
        )
        eth0, lo = ns_links.get("eth0"), ns_links.get("lo")
        marker, owner = _marker_owner(node, _read(node.prefix / MARKER))
        pids = _ns_pids(runner, node.namespace) if ns_present else ()
        existing_dirs = frozenset(d for d in cgroups.dirs(node.cgroup) if d.is_dir())
        limits = {p: (_read(p) or "").strip() for p in cgroups.limits(node.cgroup, 1, 1) if p.parent.is_dir()}
        states[node.node] = NodeState(
            namespace=ns_present,
            veth=veth is not None,
            veth_master=veth.get("master") if veth else None,
            veth_up=_is_up(veth),
            eth0=eth0 is not None,
            eth0_up=_is_up(eth0),
            eth0_addresses=_addresses(eth0),
            lo_up=_is_up(lo),
            marker=marker,
            owner=owner,
            prefix_foreign=not marker and node.prefix.is_dir() and any(node.prefix.iterdir()),
            ssh_dir=node.ssh_dir.is_dir(),
            host_key=node.host_key.is_file(),
            host_public_key=_read(node.host_key.with_name(node.host_key.name + ".pub")),
            sshd_config=_read(node.sshd_config),
            authorized_keys=_read(node.authorized_keys),
            cgroup_dirs=existing_dirs,
            cgroup_limits=limits,
            sshd_pid=_sshd_pid(node, pids),
            pids=tuple(sorted(set(pids) | _cgroup_pids(cgroups.procs_files(node.cgroup)))),
        )
    children: set[str] = set()
    for parent in cgroups.parents():
        if parent.is_dir():
            children.update(f"{parent.name}/{c.name}" for c in parent.iterdir() if c.is_dir())
    key = client_key_path(home)
    return LabState(
        bridge=br is not None,
        bridge_up=_is_up(br),
        bridge_addresses=_addresses(br),
        bridge_members=frozenset(name for name, d in links.items() if d.get("master") == BRIDGE),
        privsep_dir=Path("/run/sshd").is_dir(),
        client_key=key.is_file(),
        client_public_key=_read(key.with_name(key.name + ".pub")),
        cgroup_parent_children=frozenset(children),
        controllers_missing=frozenset(
            p for p in cgroups.enable_controllers() if not {"cpu", "memory"} <= set((_read(p) or "").split())
        ),
        nodes=states,
    )


def _is_up(link: Mapping[str, Any] | None) -> bool:
    return link is not None and "UP" in link.get("flags", [])


def _addresses(link: Mapping[str, Any] | None) -> frozenset[str]:
    if link is None:
        return frozenset()
    return frozenset(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet")


# ------------------------------------------------------------------------------------------------------------ plan


def plan_keys(nodes: Sequence[NodeLayout], home: Path, state: LabState) -> list[Step]:
    """Key material first: the sshd config and known_hosts written by ``plan_up`` quote the public keys."""
    steps: list[Step] = []
    key = client_key_path(home)
    if not state.client_key:
        steps += [
            MakeDir(key.parent, f"create {key.parent}", DIR_MODE),
            Run(keygen_argv(key, "payctl-lab"), f"generate the lab SSH key {key}"),
        ]
    foreign = [n.prefix for n in nodes if state.nodes[n.node].prefix_foreign]
    if foreign:
        raise PayctlError(
            f"prefix {', '.join(map(str, foreign))} already exists with content that the lab did not create",
            hint=f"lab down deletes a lab node's prefix: give the node a prefix of its own (it gets a {MARKER} "
            "marker), or empty that directory if it is a leftover",
        )
    elsewhere = _foreign_owners(nodes, home, state)
    if elsewhere:
        raise _owned_elsewhere(elsewhere)
    for node in nodes:
        st = state.nodes[node.node]
        if not st.marker:
            steps += [
                MakeDir(node.prefix, f"create {node.node}'s prefix {node.prefix}"),
                WriteFile(node.prefix / MARKER, _marker_text(node, home), f"mark {node.prefix} as a lab prefix"),
            ]
        if not st.ssh_dir:
            steps.append(MakeDir(node.ssh_dir, f"create {node.ssh_dir}", 0o700))
        if not st.host_key:
            steps.append(Run(keygen_argv(node.host_key, f"{node.node}@{node.deployment}"), f"{node.node} host key"))
    return steps


def plan_up(
    nodes: Sequence[NodeLayout],
    home: Path,
    state: LabState,
    cgroups: Cgroups,
    new_host_keys: frozenset[str] = frozenset(),
) -> list[Step]:
    """What is missing or different, in dependency order; an empty list means the lab is up as described.

    ``new_host_keys``: nodes whose host key was just (re)generated; a running sshd there must reload to serve it.
    """
    steps: list[Step] = []
    bridge_cidr = f"{BRIDGE_ADDRESS}/{LAB_NETWORK.prefixlen}"
    if not state.bridge:
        steps.append(Run(("ip", "link", "add", BRIDGE, "type", "bridge"), f"create bridge {BRIDGE}"))
    if bridge_cidr not in state.bridge_addresses:
        steps.append(Run(("ip", "addr", "add", bridge_cidr, "dev", BRIDGE), f"{BRIDGE} address {bridge_cidr}"))
    if not state.bridge_up:
        steps.append(Run(("ip", "link", "set", BRIDGE, "up"), f"{BRIDGE} up"))
    if not state.privsep_dir:
        steps.append(MakeDir(Path("/run/sshd"), "sshd privilege separation directory /run/sshd"))
    for path, text in cgroups.enable_controllers().items():
        if path not in state.controllers_missing:
            continue
        if not path.parent.is_dir():
            steps.append(MakeDir(path.parent, f"cgroup {path.parent}"))
        steps.append(WriteFile(path, text, f"enable cpu+memory controllers in {path.parent}", mode=None))
    public_key = state.client_public_key or ""
    for node in nodes:
        steps += _plan_node_up(node, state.nodes[node.node], cgroups, public_key, node.node in new_host_keys)
    known = _known_hosts_text(nodes, home, state)
    if known is not None:
        path = known_hosts_path(home, nodes[0].deployment)
        if not path.parent.is_dir():
            steps.append(MakeDir(path.parent, f"create {path.parent}", DIR_MODE))
        steps.append(WriteFile(path, known, f"update {path}"))
    return steps


def _plan_node_up(node: NodeLayout, st: NodeState, cgroups: Cgroups, public_key: str, new_key: bool) -> list[Step]:
    steps: list[Step] = []
    ns, name = node.namespace, node.node
    for d in cgroups.dirs(node.cgroup):
        if d not in st.cgroup_dirs:
            steps.append(MakeDir(d, f"{name} cgroup {d}"))
    for path, value in cgroups.limits(node.cgroup, node.cpus, node.memory_bytes).items():
        if st.cgroup_limits.get(path) != value:
            steps.append(WriteFile(path, value, f"{name} cgroup {path.name} = {value}", mode=None))
    if not st.namespace:
        steps.append(Run(("ip", "netns", "add", ns), f"create namespace {ns}"))
    if not st.veth or not st.eth0:
        if st.veth:  # a half-broken pair (peer gone): recreate it whole
            steps.append(Run(("ip", "link", "del", node.veth), f"remove broken veth {node.veth}"))
        steps.append(
            Run(("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", ns),
                f"veth pair {node.veth} <-> {ns}:eth0")
        )  # fmt: skip
        st = replace(
            st, veth=True, veth_master=None, veth_up=False, eth0=True, eth0_up=False, eth0_addresses=frozenset()
        )
    if st.veth_master != BRIDGE:
        steps.append(Run(("ip", "link", "set", node.veth, "master", BRIDGE), f"attach {node.veth} to {BRIDGE}"))
    if not st.veth_up:
        steps.append(Run(("ip", "link", "set", node.veth, "up"), f"{node.veth} up"))
    cidr = f"{node.address}/{LAB_NETWORK.prefixlen}"
    if cidr not in st.eth0_addresses:
        steps.append(Run(("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"), f"{ns}:eth0 address {cidr}"))
    if not st.eth0_up:
        steps.append(Run(("ip", "-n", ns, "link", "set", "eth0", "up"), f"{ns}:eth0 up"))
    if not st.lo_up:
        steps.append(Run(("ip", "-n", ns, "link", "set", "lo", "up"), f"{ns}:lo up"))
    config = render_sshd_config(node)
    if st.sshd_config != config:
        steps.append(WriteFile(node.sshd_config, config, f"write {node.sshd_config}", 0o600))
    if st.authorized_keys != public_key:
        steps.append(WriteFile(node.authorized_keys, public_key, f"authorize the lab key on {name}", 0o600))
    if st.sshd_pid is not None and (st.sshd_config != config or new_key):
        # SIGHUP makes sshd re-exec itself, re-reading config and host key: sessions survive, nothing else restarts.
        steps.append(Run(("kill", "-HUP", str(st.sshd_pid)), f"reload {name}'s sshd (pid {st.sshd_pid})"))
    if st.sshd_pid is None:
        steps += [
            Run(start_sshd_argv(node, cgroups), f"start sshd for {name} on {node.address}:{SSH_PORT}"),
            WaitSshd(node, f"wait for {name}'s sshd"),
        ]
    return steps


def _known_hosts_text(nodes: Sequence[NodeLayout], home: Path, state: LabState) -> str | None:
    """known_hosts with each lab node's line set to its current host key (in place); None when already so."""
    current = _read(known_hosts_path(home, nodes[0].deployment)) or ""
    wanted: dict[str, str] = {}
    for n in nodes:
        pub = state.nodes[n.node].host_public_key
        if pub:
            kind, body = pub.split()[:2]
            wanted[n.address] = f"{n.address} {kind} {body}"
    lines: list[str] = []
    for line in current.splitlines():
        host = line.split(" ", 1)[0]
        if host in wanted:
            lines.append(wanted.pop(host))
        elif host not in {n.address for n in nodes}:
            lines.append(line)
    lines += wanted.values()
    text = "".join(f"{line}\n" for line in lines)
    return None if text == current else text


def plan_down(
    nodes: Sequence[NodeLayout], home: Path, state: LabState, cgroups: Cgroups, *, force: bool = False
) -> list[Step]:
    """Everything the lab made for these nodes, in teardown order. Nodes made from another PAYCTL_HOME are refused
    unless ``force`` (their data and secrets are someone else's)."""
    elsewhere = _foreign_owners(nodes, home, state)
    if elsewhere and not force:
        raise _owned_elsewhere(elsewhere)
    steps: list[Step] = []
    for node in nodes:
        st = state.nodes[node.node]
        procs = cgroups.procs_files(node.cgroup)
        if st.pids or st.namespace:
            steps.append(
                StopProcesses(node.namespace if st.namespace else None, procs, f"stop {node.node}'s processes")
            )
        if st.veth:  # deleting one end removes the pair, so before the namespace that holds the other end
            steps.append(Run(("ip", "link", "del", node.veth), f"remove {node.veth}"))
        if st.namespace:
            steps.append(Run(("ip", "netns", "del", node.namespace), f"remove namespace {node.namespace}"))
        for d in sorted(st.cgroup_dirs):
            steps.append(RemoveDir(d, f"remove cgroup {d}"))
        if st.marker:
            steps.append(RemoveTree(node.prefix, f"remove prefix {node.prefix}"))
    ours = {n.veth for n in nodes}
    if state.bridge and not (state.bridge_members - ours):
        steps.append(Run(("ip", "link", "del", BRIDGE), f"remove bridge {BRIDGE} (no other lab node on it)"))
    our_groups = {n.cgroup for n in nodes}
    if not (state.cgroup_parent_children - our_groups):
        steps += [RemoveDir(p, f"remove cgroup {p}") for p in cgroups.parents() if p.is_dir()]
    known = known_hosts_path(home, nodes[0].deployment)
    current = _read(known)
    if current is not None:
        addresses = {n.address for n in nodes}
        kept = "".join(f"{ln}\n" for ln in current.splitlines() if ln.split(" ", 1)[0] not in addresses)
        if kept != current:
            steps.append(WriteFile(known, kept, f"forget the lab host keys in {known}", 0o644))
    return steps


# --------------------------------------------------------------------------------------------------------- execute


def execute(steps: Sequence[Step], runner: Runner, *, stop_timeout: float = 10.0) -> None:
    for step in steps:
        if isinstance(step, Run):
            runner(step.argv)
        elif isinstance(step, MakeDir):
            step.path.mkdir(mode=step.mode, parents=True, exist_ok=True)
            step.path.chmod(step.mode)
        elif isinstance(step, WriteFile):
            _write(step)
        elif isinstance(step, RemoveDir):
            _rmdir(step.path)
        elif isinstance(step, RemoveTree):
            if not (step.path / MARKER).is_file():
                raise DeployError(f"refusing to remove {step.path}: it has no {MARKER} marker")
            shutil.rmtree(step.path)
            with suppress(OSError):  # the common parent (/var/lib/payctl-lab) once its last node is gone
                step.path.parent.rmdir()
        elif isinstance(step, StopProcesses):
            _stop(step, runner, stop_timeout)
        else:
            _wait_sshd(step.node, runner)


def _write(step: WriteFile) -> None:
    try:
        if step.mode is None:  # kernel control file: one write in place
            with step.path.open("w") as fh:
                fh.write(step.text)
            return
        tmp = step.path.with_name(f".{step.path.name}.tmp")
        tmp.write_text(step.text)
        tmp.chmod(step.mode)
        os.replace(tmp, step.path)
    except OSError as exc:
        raise DeployError(f"cannot write {step.path}: {exc.strerror or exc}") from None


def _rmdir(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DeployError(f"cannot remove cgroup {path}: {exc.strerror}") from None
            time.sleep(0.05)


def _stop(step: StopProcesses, runner: Runner, timeout: float) -> None:
    if step.namespace is None and not step.procs_files:
        return
    deadline = time.monotonic() + timeout
    signalled: set[int] = set()

    def listed() -> set[int]:
        pids = _cgroup_pids(step.procs_files)
        if step.namespace is not None:
            pids.update(_ns_pids(runner, step.namespace))
        return {p for p in pids if p != os.getpid() and not _is_zombie(p)}

    while pids := listed():
        late = time.monotonic() > deadline
        for pid in pids if late else pids - signalled:
            _signal(pid, signal.SIGKILL if late else signal.SIGTERM)
        signalled |= pids
        if time.monotonic() > deadline + 5:
            raise DeployError(f"processes {sorted(pids)} of {step.namespace or 'the lab'} survived SIGKILL")
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    stat = _read(Path(f"/proc/{pid}/stat"))
    return stat is None or stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_sshd(node: NodeLayout, runner: Runner, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _sshd_pid(node, _ns_pids(runner, node.namespace)) is not None:
            return
        time.sleep(0.05)
    log = (_read(node.sshd_log) or "").strip().splitlines()[-5:]
    raise DeployError(
        f"sshd for lab node {node.node} did not start within {timeout:.0f}s",
        hint=f"its log {node.sshd_log} says: {' | '.join(log) or '(empty)'}",
    )


# ------------------------------------------------------------------------------------------------------ public API


@dataclass(frozen=True)
class LabNodeStatus:
    node: str
    address: str
    namespace: str
    namespace_present: bool
    veth: str
    veth_state: str
    sshd_pid: int | None
    cgroup: str
    cgroup_present: bool
    cpus: float
    memory_gb: float
    processes: int

    @property
    def up(self) -> bool:
        return self.namespace_present and self.veth_state == "up" and self.sshd_pid is not None and self.cgroup_present


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise PayctlError(
            f"payctl lab {action} needs root (it creates network namespaces, links and cgroups)",
            hint=f"run it as root, e.g. `sudo payctl lab {action} -i inventories/lab-2node.yml`",
        )


@contextmanager
def _lab_lock(path: Path = LOCK_FILE, timeout: float = 120.0) -> Iterator[None]:
    """Serialise lab commands on this machine: two concurrent `lab up`s would race on the same links."""
    with path.open("a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PayctlError(
                        f"another payctl lab command holds {path}", hint="wait for it to finish"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


Progress = Callable[[Step], None]


def _noop(_: Step) -> None:
    pass


def lab_up(inventory: LabInventory, home: Path, runner: Runner = run_command, progress: Progress = _noop) -> list[Step]:
    """Bring the inventory's lab hosts up, repairing whatever is missing; returns the steps taken (none if up)."""
    require_root("up")
    nodes = layout(inventory)
    cgroups = detect_cgroups()
    with _lab_lock():
        done: list[Step] = []
        before = observe(nodes, home, cgroups, runner)
        keys = plan_keys(nodes, home, before)
        _run_steps(keys, runner, progress)
        rekeyed = frozenset(n.node for n in nodes if not before.nodes[n.node].host_key)
        rest = plan_up(nodes, home, observe(nodes, home, cgroups, runner), cgroups, rekeyed)
        _run_steps(rest, runner, progress)
        done += keys + rest
        return done


def lab_down(
    inventory: LabInventory,
    home: Path,
    runner: Runner = run_command,
    progress: Progress = _noop,
    stop_timeout: float = 10.0,
    *,
    force: bool = False,
) -> list[Step]:
    """Stop everything inside the lab's namespaces and remove only what the lab created; returns the steps taken.

    Processes get SIGTERM, and SIGKILL when still there after ``stop_timeout`` seconds. Nodes made from another
    PAYCTL_HOME are refused unless ``force``.
    """
    require_root("down")
    nodes = layout(inventory)
    cgroups = detect_cgroups()
    with _lab_lock():
        steps = plan_down(nodes, home, observe(nodes, home, cgroups, runner), cgroups, force=force)
        _run_steps(steps, runner, progress, stop_timeout)
        return steps


def lab_status(inventory: LabInventory, home: Path, runner: Runner = run_command) -> list[LabNodeStatus]:
    require_root("status")
    nodes = layout(inventory)
    cgroups = detect_cgroups()
    state = observe(nodes, home, cgroups, runner)
    rows = []
    for n in nodes:
        st = state.nodes[n.node]
        veth = "absent" if not st.veth else ("up" if st.veth_up and st.veth_master == BRIDGE else "down")
        rows.append(
            LabNodeStatus(
                node=n.node,
                address=n.address,
                namespace=n.namespace,
                namespace_present=st.namespace,
                veth=n.veth,
                veth_state=veth,
                sshd_pid=st.sshd_pid,
                cgroup=n.cgroup,
                cgroup_present=len(st.cgroup_dirs) == len(cgroups.dirs(n.cgroup)),
                cpus=n.cpus,
                memory_gb=round(n.memory_bytes / 2**30, 3),
                processes=len(st.pids),
            )
        )
    return rows


def _run_steps(steps: Sequence[Step], runner: Runner, progress: Progress, stop_timeout: float = 10.0) -> None:
    for step in steps:
        progress(step)
        execute([step], runner, stop_timeout=stop_timeout)
