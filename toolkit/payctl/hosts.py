"""The connection layer: pyinfra's Python API (never ``pyinfra_cli``) built from a payctl inventory.

``connect(inventory, home)`` yields a ``Connected``: a single-use pyinfra ``State`` whose hosts are the inventory's
nodes, reached over SSH (paramiko) with the node's user, key and port. A node with ``via`` is reached through its
jump host: payctl opens its own paramiko session to the jump host and hands pyinfra a ``direct-tcpip`` channel to the
node as the socket (``ssh_paramiko_connect_kwargs={"sock": channel}``), so no ssh_config file or OpenSSH client is
involved. Host keys are checked against ``$PAYCTL_HOME/<deployment>/known_hosts`` (``payctl lab up`` writes the lab
nodes' keys there; other hosts are accepted on first use and verified afterwards, never prompted for).

With ``fake=True`` (dry runs of non-lab inventories) the hosts use pyinfra's ``@fake`` connector with no delay:
nothing is contacted and facts come back empty.

Connection and operation failures become ``DeployError``s naming the node, its address and what went wrong.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

# The fake connector reads its delay when it is imported; dry runs must not sleep per command.
os.environ.setdefault("PYINFRA_FAKE_DELAY", "0")
os.environ.setdefault("PYINFRA_FAKE_DELAY_JITTER", "0")

import gevent  # type: ignore[import-untyped]
import paramiko
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.inventory import Inventory as PyinfraInventory
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.api.state import BaseStateCallback, State
from pyinfra.connectors.sshuserclient.client import get_host_keys

from payctl.errors import DeployError, PayctlError
from payctl.lock import Opener, Shell
from payctl.secrets import DIR_MODE, known_hosts_path

if TYPE_CHECKING:
    from pyinfra.api.host import Host

LAB_NETWORK = ipaddress.IPv4Network("10.77.0.0/24")

# The core never prints: without a handler, Python's last-resort handler would put pyinfra's and paramiko's
# warnings and tracebacks on stderr. Errors reach the user as DeployErrors; a CLI may still configure logging.
for _name in ("pyinfra", "paramiko"):
    if not any(isinstance(h, logging.NullHandler) for h in logging.getLogger(_name).handlers):
        logging.getLogger(_name).addHandler(logging.NullHandler())


class SSHSpec(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def port(self) -> int: ...

    def key_path(self, home: Path | None = None) -> Path: ...


class HostNode(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def public_address(self) -> str | None: ...

    @property
    def private_address(self) -> str: ...

    @property
    def via(self) -> str | None: ...

    @property
    def ssh(self) -> SSHSpec: ...


class HostInventory(Protocol):
    @property
    def deployment(self) -> str: ...

    @property
    def nodes(self) -> Sequence[HostNode]: ...


@dataclass(frozen=True)
class Target:
    """How to reach one node: directly at ``address``, or through ``via`` (whose own target is ``jump``)."""

    node: str
    address: str
    port: int
    user: str
    key: Path
    via: str | None = None
    jump: Target | None = None

    def describe(self) -> str:
        where = f"{self.user}@{self.address}:{self.port}"
        return f"{self.node} ({where} via {self.via})" if self.via else f"{self.node} ({where})"


def targets(inventory: HostInventory, home: Path) -> dict[str, Target]:
    """Per node, where payctl connects: public address if any, else private; through ``via`` at the private one."""
    by_name = {n.name: n for n in inventory.nodes}

    def direct(n: HostNode) -> Target:
        return Target(n.name, n.public_address or n.private_address, n.ssh.port, n.ssh.user, n.ssh.key_path(home))

    out: dict[str, Target] = {}
    for n in inventory.nodes:
        if n.via is None:
            out[n.name] = direct(n)
            continue
        jump = direct(by_name[n.via])
        out[n.name] = Target(n.name, n.private_address, n.ssh.port, n.ssh.user, n.ssh.key_path(home), n.via, jump)
    return out


def is_lab(inventory: HostInventory) -> bool:
    """A lab inventory addresses only lab hosts (10.77.0.0/24 namespaces on this machine)."""
    return all(ipaddress.ip_address(n.public_address or n.private_address) in LAB_NETWORK for n in inventory.nodes)


def use_fake(inventory: HostInventory, dry_run: bool) -> bool:
    """Dry runs contact no host unless the inventory is a lab (lab hosts are on this machine: real facts are free)."""
    return dry_run and not is_lab(inventory)


class _Errors(BaseStateCallback):
    """Collects pyinfra's per-host connection errors so they can be reported by node name."""

    def __init__(self) -> None:
        self.connect: dict[str, str] = {}

    def host_connect_error(self, state: State, host: Host, error: Any) -> None:  # type: ignore[override]
        self.connect[host.name] = str(error.args[0] if getattr(error, "args", None) else error)


Redactor = Callable[[str], str]


@dataclass
class Connected:
    """A connected pyinfra State plus the node → pyinfra Host mapping. Single use: add ops, run once, close."""

    state: State
    hosts: dict[str, Host]
    targets: dict[str, Target]
    fake: bool
    redact: Redactor
    _jumps: list[paramiko.SSHClient] = field(default_factory=list)
    _ops: list[tuple[str, dict[Any, Any]]] = field(default_factory=list)

    def host(self, node: str) -> Host:
        return self.hosts[node]

    def add_op(self, op: Callable[..., Any], *args: Any, nodes: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``pyinfra.api.add_op`` on the given nodes (default: all). Returns {pyinfra Host: OperationMeta}."""
        hosts = [self.hosts[n] for n in nodes] if nodes is not None else list(self.hosts.values())
        metas = add_op(self.state, op, *args, host=hosts, **kwargs)
        label = kwargs.get("name") or f"{op.__module__.rsplit('.', 1)[-1]}.{op.__name__}"
        self._ops.append((str(label), metas))
        return metas

    def run(self) -> None:
        """Run every added operation; a failure is a DeployError naming the node, the operation and its output."""
        try:
            run_ops(self.state)
        except PyinfraError as exc:
            raise DeployError(
                self.redact(self._first_failure() or f"pyinfra failed: {exc}"),
                hint="the output comes from the host; fix the cause and re-apply (applying is idempotent)",
            ) from None
        failure = self._first_failure()
        if failure:
            raise DeployError(self.redact(failure))

    def _first_failure(self) -> str | None:
        node_of = {h.name: node for node, h in self.hosts.items()}
        for label, metas in self._ops:
            for host, meta in metas.items():
                if meta.is_complete() and not meta.did_succeed(_raise_if_not_complete=False):
                    text = "\n".join((meta.stderr_lines or meta.stdout_lines)[-10:])
                    return f"{node_of.get(host.name, host.name)}: operation {label} failed: {text or 'no output'}"
        return None

    def close(self) -> None:
        try:
            disconnect_all(self.state)
        finally:
            for client in self._jumps:
                client.close()
            self._jumps.clear()


def _load_key(t: Target, role: str) -> paramiko.PKey:
    if not t.key.is_file():
        raise DeployError(
            f"cannot connect to {role} {t.describe()}: SSH key {t.key} does not exist",
            hint="set nodes[].ssh.key in the inventory (relative paths are under PAYCTL_HOME); "
            "for a lab inventory run `payctl lab up -i INV` first, with the same PAYCTL_HOME",
        )
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(t.key))
    except (paramiko.SSHException, ValueError):
        pass
    for cls in (paramiko.RSAKey, paramiko.ECDSAKey):
        try:
            return cls.from_private_key_file(str(t.key))
        except (paramiko.SSHException, ValueError):
            continue
    raise DeployError(
        f"cannot connect to {role} {t.describe()}: {t.key} is not a usable private key (or needs a passphrase)",
        hint="use an unencrypted ed25519, ECDSA or RSA key",
    )


def _open_jump(t: Target, jump: Target, known_hosts: Path, timeout: float) -> tuple[paramiko.SSHClient, Any]:
    client = paramiko.SSHClient()
    known_hosts.touch(mode=0o600, exist_ok=True)
    client.load_host_keys(str(known_hosts))  # also where AutoAddPolicy saves a first-seen key
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    pkey = _load_key(jump, "jump host")
    try:
        client.connect(
            jump.address,
            port=jump.port,
            username=jump.user,
            pkey=pkey,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_channel("direct-tcpip", (t.address, t.port), ("127.0.0.1", 0), timeout=timeout)
    except paramiko.BadHostKeyException:
        client.close()
        raise DeployError(
            f"cannot connect to {t.describe()}: jump host {jump.describe()} presented a different host key",
            hint=f"if the host was rebuilt, remove its line from {known_hosts}",
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise DeployError(
            f"cannot connect to {t.describe()}: jump host {jump.describe()} rejected key {jump.key}",
            hint="check the jump host's ssh.user and ssh.key in the inventory",
        ) from None
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise DeployError(
            f"cannot connect to {t.describe()}: {exc or type(exc).__name__}",
            hint="check that the jump host is reachable and that it can reach the node's private address",
        ) from None
    return client, channel


def _quiet_ctrl_c() -> None:
    """Ctrl-C usually lands in one of pyinfra's gevent greenlets (reading SSH output); gevent's hub then printed that
    greenlet's traceback before re-raising KeyboardInterrupt in the main greenlet. Keep the re-raise (the apply's
    cleanup releases the lock and the CLI prints "interrupted", exit 130) without the traceback."""
    hub: Any = gevent.get_hub()
    if not issubclass(KeyboardInterrupt, hub.NOT_ERROR):
        hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)


@contextmanager
def connect(
    inventory: HostInventory,
    home: Path,
    *,
    fake: bool = False,
    nodes: Sequence[str] | None = None,
    timeout: int = 10,
    redact: Redactor = lambda s: s,
) -> Iterator[Connected]:
    """Connect to the inventory's nodes (all, or ``nodes``) and yield a ``Connected``; disconnects on exit.

    Raises DeployError naming every node that could not be reached (bad key, refused, unreachable, host key).
    """
    all_targets = targets(inventory, home)
    chosen = list(nodes) if nodes is not None else list(all_targets)
    known_hosts = known_hosts_path(home, inventory.deployment)
    _quiet_ctrl_c()
    jumps: list[paramiko.SSHClient] = []
    names: list[tuple[str, dict[str, Any]]] = []
    try:
        for node in chosen:
            t = all_targets[node]
            if fake:
                names.append((f"@fake/{node}", {"fake_delay": 0, "fake_delay_jitter": 0}))
                continue
            known_hosts.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            _load_key(t, "node")  # a clear error before pyinfra's
            data: dict[str, Any] = {
                "ssh_hostname": t.address,
                "ssh_port": t.port,
                "ssh_user": t.user,
                "ssh_key": str(t.key),
                "ssh_known_hosts_file": str(known_hosts),
                "ssh_strict_host_key_checking": "accept-new",
                "ssh_allow_agent": False,
                "ssh_look_for_keys": False,
                "ssh_config_file": os.devnull,
            }
            if t.jump is not None:
                client, channel = _open_jump(t, t.jump, known_hosts, timeout)
                jumps.append(client)
                data["ssh_paramiko_connect_kwargs"] = {"sock": channel}
            names.append((node, data))
        # pyinfra memoises known_hosts per process; `lab up` may have rewritten the file since (new lab host keys).
        get_host_keys.cache.clear()
        errors = _Errors()
        config = Config(CONNECT_TIMEOUT=timeout, FAIL_PERCENT=0)  # type: ignore[no-untyped-call]
        state = State(PyinfraInventory((names, {})), config)  # type: ignore[no-untyped-call]
        state.add_callback_handler(errors)  # type: ignore[no-untyped-call]
        with suppress(PyinfraError):  # failures are reported below, by node
            connect_all(state)
        pyinfra_name = {n: (f"@fake/{n}" if fake else n) for n in chosen}
        failed = {n: errors.connect.get(pyinfra_name[n], "not connected") for n in chosen}
        failed = {n: why for n, why in failed.items() if pyinfra_name[n] not in {h.name for h in state.active_hosts}}
        if failed:
            disconnect_all(state)
            raise _connect_error(failed, all_targets, known_hosts)
        hosts = {n: state.inventory.get_host(pyinfra_name[n]) for n in chosen}
        conn = Connected(state, hosts, {n: all_targets[n] for n in chosen}, fake, redact, jumps)
    except BaseException:
        for client in jumps:
            client.close()
        raise
    try:
        yield conn
    finally:
        conn.close()


def _connect_error(failed: dict[str, str], all_targets: dict[str, Target], known_hosts: Path) -> DeployError:
    lines = [f"{all_targets[n].describe()}: {why}" for n, why in failed.items()]
    text = " ".join(failed.values())
    if "Authentication" in text:
        hint = "the host rejected the key: check nodes[].ssh.user and ssh.key (lab: `payctl lab up` makes the key)"
    elif "host key" in text.lower():
        hint = f"the host key changed; if the host was rebuilt, remove its line from {known_hosts}"
    else:
        hint = "check that the host is up, its address and ssh.port are right and sshd runs (lab: `payctl lab status`)"
    return DeployError("cannot connect to " + "; ".join(lines), hint=hint)


def shell_of(host: Host) -> Shell:
    """Run one command on a connected pyinfra host, outside any operation (so it is never counted as a change)."""

    def run(command: str) -> tuple[bool, str, str]:
        ok, output = host.run_shell_command(command)
        return bool(ok), output.stdout, output.stderr

    return run


@contextmanager
def node_shells(
    inventory: HostInventory, home: Path, *, conn: Connected | None = None, timeout: int = 5
) -> Iterator[Opener]:
    """An ``Opener`` for the deploy lock: a shell per node, from ``conn`` when it holds the node, else from a
    connection of its own (opened on first use, closed on exit). A node that does not answer raises the same
    DeployError every time it is asked for, without trying again."""
    opened: dict[str, Shell | PayctlError] = {}
    with ExitStack() as stack:

        def open_shell(node: str) -> Shell:
            if node not in opened:
                if conn is not None and node in conn.hosts:
                    opened[node] = shell_of(conn.host(node))
                else:
                    try:
                        own = stack.enter_context(connect(inventory, home, nodes=[node], timeout=timeout))
                        opened[node] = shell_of(own.host(node))
                    except PayctlError as exc:
                        opened[node] = exc
            got = opened[node]
            if isinstance(got, PayctlError):
                raise got
            return got

        yield open_shell
