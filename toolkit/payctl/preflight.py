"""Checks a deploy makes on the hosts before it changes anything.

``check_free_ports``: on a node that does not run the deployment yet, a port the plan will bind (MariaDB 3306, Redis
6379, nginx 80/443 ...) must not already be held by another program (a distribution MariaDB, a stray test server).
Without this check the apply writes every file, starts supervisord, and only the health check fails two minutes later
with "payctl-mariadb FATAL". A node that already runs the deployment is not checked: its own programs hold the ports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from payctl.errors import DeployError

if TYPE_CHECKING:
    from payctl.plan import Plan
    from payctl.runtimes import NodeFacts

#: One read-only command: TCP listeners with their process (``ss`` is iproute2's; absent -> no check).
LISTENERS_COMMAND = "if command -v ss >/dev/null 2>&1; then ss -Hltnp; fi"
_WILDCARDS = frozenset({"0.0.0.0", "::", "*"})
_USERS = re.compile(r'\("(?P<name>[^"]*)",pid=(?P<pid>\d+)')

Shell = Callable[[str], tuple[bool, str, str]]


#: Daemons of the Debian packages the systemd runtime stops and disables itself before starting its own units
#: (runtimes.DEBIAN_SERVICES; ``ss`` shows at most 15 characters of a name, hence the prefix for the exporters).
DEBIAN_DAEMONS = ("mariadbd", "mysqld", "redis-server", "redis-sentinel", "nginx", "prometheus")


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    name: str = ""  # process name as ss shows it; "" when ss could not tell
    pid: int | None = None

    @property
    def process(self) -> str:
        return f'"{self.name}" (pid {self.pid})' if self.name else "another program"


def parse_listeners(text: str) -> list[Listener]:
    """``ss -Hltnp`` lines -> listeners (``LISTEN 0 80 0.0.0.0:3306 0.0.0.0:* users:(("mariadbd",pid=9,fd=20))``)."""
    out: list[Listener] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[3]:
            continue
        host, _, port = fields[3].rpartition(":")
        host = host.strip("[]").split("%", 1)[0]
        if not port.isdigit():
            continue
        m = _USERS.search(line)
        out.append(Listener(host, int(port), m["name"], int(m["pid"])) if m else Listener(host, int(port)))
    return out


def _handled(name: str, handled: Iterable[str]) -> bool:
    return any(name == d or (d == "prometheus" and name.startswith(d)) for d in handled)


def conflicts(
    binds: Iterable[tuple[str, str, int]], listeners: Iterable[Listener], handled: Iterable[str] = ()
) -> list[str]:
    """``binds``: (component, address, port) the plan needs; a listener on that port at the same or a wildcard
    address makes the bind fail (EADDRINUSE). ``handled``: daemons the apply itself stops (not a conflict)."""
    found: list[str] = []
    held = [li for li in listeners if not (li.name and _handled(li.name, handled))]
    for component, address, port in binds:
        for li in held:
            if li.port == port and (li.address == address or li.address in _WILDCARDS):
                found.append(f"port {port} on {address} ({component}) is already taken by {li.process}, listening on "
                             f"{li.address}:{li.port}")  # fmt: skip
                break
    return found


def check_free_ports(
    plan: Plan,
    facts: Mapping[str, NodeFacts],
    shells: Mapping[str, Shell],
    nodes: tuple[str, ...] | None = None,
    handled: Iterable[str] = (),
) -> None:
    """Raise one DeployError listing every port the plan needs that another program holds, on nodes new to the
    deployment (``facts[node].live`` false and no supervisord of ours). ``handled``: daemon names the runtime stops
    itself (``DEBIAN_DAEMONS`` on systemd VMs), never reported."""
    problems: list[str] = []
    for node in plan.active_nodes:
        if node.name not in shells or (nodes is not None and node.name not in nodes):
            continue
        f = facts.get(node.name)
        if f is None or f.live or f.supervisord_pid is not None:
            continue
        ok, out, _ = shells[node.name](LISTENERS_COMMAND)
        if not ok:
            continue
        tls = node.nginx is not None and node.nginx.tls
        binds = [(c.name, p.address, p.port) for c in node.components for p in c.ports if p.name != "https" or tls]
        problems += [f"{node.name}: {msg}" for msg in conflicts(binds, parse_listeners(out), handled)]
    if problems:
        raise DeployError(
            "; ".join(problems),
            hint="payctl never takes over a port it did not open: stop or move that program on the node (e.g. a "
            "distribution MariaDB: systemctl disable --now mariadb), then run the same command again",
        )
