"""The faults of ``payctl drill``, on lab hosts only, each through a ``CommandRunner`` (the seam tests replace).

* ``kill``: ``kill -9`` the program's process as its node's supervisord reports it (and, for payapp, every worker the
  master started: ``pgrep -P``), never a process found by name. supervisord (autorestart) starts it again.
* ``kill-worker``: ``kill -9`` one payapp worker; the payapp master starts a new one.
* ``restart-all``: ``supervisorctl restart all`` on the node: every program of the lab host stops and starts.
* ``failover``: ``kill -9`` the primary's MariaDB, keep it stopped, then the caller's promotion (``payctl.drilldb``).
* ``partition``: ``ip link set <veth> down`` on the root side of the node's veth for ``fault_s`` seconds, then up
  again (also when interrupted). On a one-node lab that cuts the client side: the LB itself is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from payctl.errors import PayctlError
from payctl.operate import parse_supervisor_status
from payctl.serverchecks import CommandRunner


class FaultError(PayctlError):
    """A fault could not be injected (nothing was done, or what was done is in the message)."""


@dataclass(frozen=True)
class Node:
    name: str
    namespace: str
    prefix: str
    veth: str  # the root namespace's end of the node's veth pair
    address: str

    @property
    def supervisor_conf(self) -> str:
        return f"{self.prefix}/supervisor/supervisord.conf"


@dataclass(frozen=True)
class ProgramState:
    state: str
    pid: int | None


@dataclass(frozen=True)
class Fault:
    node: str
    action: str
    start: float  # epoch seconds
    end: float  # when the fault stopped acting (a kill: at once; a partition: when the link came back)
    killed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # program -> pids killed
    detail: str = ""


def supervisorctl(node: Node, *args: str) -> list[str]:
    return ["ip", "netns", "exec", node.namespace, "supervisorctl", "-c", node.supervisor_conf, *args]


def snapshot(node: Node, runner: CommandRunner) -> dict[str, ProgramState]:
    """The node's programs as its supervisord reports them ({} when supervisord does not answer)."""
    res = runner(supervisorctl(node, "status"), 15)  # exit 3 when a program is not RUNNING: still read
    return {p.name: ProgramState(p.state, p.pid) for p in parse_supervisor_status(res.stdout)}


def _pid(node: Node, program: str, runner: CommandRunner) -> int:
    st = snapshot(node, runner).get(program)
    if st is None or st.state != "RUNNING" or st.pid is None:
        raise FaultError(f"{node.name}: {program} is not running ({st.state if st else 'not deployed'})",
                         hint="payctl status -i INV shows the programs; drill a healthy deployment")  # fmt: skip
    return st.pid


def running_pid(node: Node, program: str, runner: CommandRunner) -> int:
    """The pid supervisord reports for ``program`` on ``node`` (FaultError when it is not RUNNING)."""
    return _pid(node, program, runner)


def _children(pid: int, runner: CommandRunner) -> tuple[int, ...]:
    res = runner(["pgrep", "-P", str(pid)], 10)
    return tuple(int(x) for x in res.stdout.split() if x.isdigit())


def _kill(pids: tuple[int, ...], runner: CommandRunner) -> None:
    res = runner(["kill", "-9", *map(str, pids)], 10)
    if res.returncode != 0 and "No such process" not in res.stderr:
        raise FaultError(f"kill -9 {' '.join(map(str, pids))} failed: {res.stderr.strip()}")


def inject(
    action: Literal["kill-worker", "kill", "restart-all", "partition", "failover"],
    program: str,
    node: Node,
    runner: CommandRunner,
    fault_s: float,
    sleep: Callable[[float], None] = time.sleep,
    promote: Callable[[], str] | None = None,
) -> Fault:
    """Do the fault now; returns what was done and when (a partition returns once the link is back up, a failover
    once ``promote`` returned)."""
    pause = sleep
    if action == "failover":
        if promote is None:
            raise FaultError("a failover drill needs the promotion to run")
        pid = _pid(node, program, runner)
        start = time.time()
        _kill((pid,), runner)
        # Keep it down: supervisord would start it again (autorestart); the replica is promoted instead.
        runner(supervisorctl(node, "stop", program), 130)
        done = promote()
        return Fault(node.name, action, start, time.time(), {program: (pid,)}, f"killed {program} pid {pid}; {done}")
    if action == "kill-worker":
        master = _pid(node, program, runner)
        workers = _children(master, runner)
        if not workers:
            raise FaultError(f"{node.name}: {program} (pid {master}) has no worker process to kill")
        start = time.time()
        _kill(workers[:1], runner)
        return Fault(node.name, action, start, start, {"worker": workers[:1]}, f"killed worker pid {workers[0]}")
    if action == "kill":
        main = _pid(node, program, runner)
        pids = (main, *_children(main, runner)) if program == "payctl-app" else (main,)
        start = time.time()
        _kill(pids, runner)
        return Fault(node.name, action, start, start, {program: (main,)},
                     f"killed {program} pid {' '.join(map(str, pids))}")  # fmt: skip
    if action == "restart-all":
        before = {k: v.pid for k, v in snapshot(node, runner).items() if v.pid is not None}
        start = time.time()
        res = runner(supervisorctl(node, "restart", "all"), 300)
        if res.returncode != 0:
            raise FaultError(f"{node.name}: supervisorctl restart all failed: {(res.stderr or res.stdout).strip()}")
        return Fault(node.name, action, start, start, {k: (v,) for k, v in before.items()},
                     f"restarted {len(before)} programs")  # fmt: skip
    if action == "partition":
        start = time.time()
        down = runner(["ip", "link", "set", node.veth, "down"], 10)
        if down.returncode != 0:
            raise FaultError(f"ip link set {node.veth} down failed: {down.stderr.strip()}")
        try:
            pause(fault_s)
        finally:
            up = runner(["ip", "link", "set", node.veth, "up"], 10)
        end = time.time()
        if up.returncode != 0:
            raise FaultError(
                f"ip link set {node.veth} up failed: {up.stderr.strip()}",
                hint=f"run `ip link set {node.veth} up` (or payctl lab up -i INV, which repairs links)",
            )
        return Fault(node.name, action, start, end, {}, f"{node.veth} down for {end - start:.1f}s")
    raise FaultError(f"unknown fault action {action!r}")
