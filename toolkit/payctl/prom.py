"""A small client for Prometheus's HTTP API, directly or through an SSH tunnel (Prometheus's port is not public).

    with tunnel(inv, home) as client:            # SSH to the monitoring node, direct-tcpip to <private>:9090
        client.query("up")                       # -> [Sample(labels, value)]
        client.query_range("up", start, end, 5)  # -> [RangeSeries(labels, points)]
        client.targets()                          # -> [ScrapeTarget(job, node, url, health, last_error)]

Every HTTP request opens its own connection through an ``Opener`` (a socket to ``host:port``): a plain TCP socket
in tests (``direct(host, port)``), a paramiko ``direct-tcpip`` channel over one SSH connection in ``tunnel``. No
local port is opened, so nothing else on this machine can use the tunnel. Errors become ``MonitoringError``.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import paramiko

from payctl import hosts
from payctl.errors import PayctlError
from payctl.secrets import known_hosts_path

#: opens a connected socket-like object (sendall/recv/makefile/close) to Prometheus
Opener = Callable[[], Any]


class MonitoringError(PayctlError):
    """Prometheus could not be reached or answered with an error."""


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class RangeSeries:
    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]  # (unix time, value)


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    node: str
    url: str
    health: str  # up, down, unknown
    last_error: str

    def as_dict(self) -> dict[str, str]:
        return {"job": self.job, "node": self.node, "url": self.url, "health": self.health,
                "last_error": self.last_error}  # fmt: skip


class _Conn(http.client.HTTPConnection):
    def __init__(self, opener: Opener, host: str, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self._opener = opener

    def connect(self) -> None:
        self.sock = self._opener()


class PromClient:
    """Prometheus's /api/v1 over whatever ``opener`` connects to."""

    def __init__(self, opener: Opener, where: str = "prometheus", timeout: float = 10.0) -> None:
        self._opener = opener
        self._host = where  # for messages only; the HTTP Host header is always "prometheus"
        self._timeout = timeout

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = path + ("?" + urlencode(params) if params else "")
        conn = _Conn(self._opener, "prometheus", self._timeout)
        try:
            conn.request("GET", url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException, paramiko.SSHException) as exc:
            raise MonitoringError(f"cannot reach Prometheus on {self._host}: {exc or type(exc).__name__}",
                                  hint="phase 4 deploys Prometheus: is payctl-prometheus running?") from exc
        finally:
            conn.close()
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise MonitoringError(f"Prometheus on {self._host} answered {resp.status} with no JSON") from exc
        if doc.get("status") != "success":
            raise MonitoringError(f"Prometheus rejected {path}: {doc.get('errorType')}: {doc.get('error')}",
                                  hint="a query payctl sends is wrong for this Prometheus version")  # fmt: skip
        return doc["data"]

    def ready(self) -> bool:
        try:
            self._get("/api/v1/status/buildinfo")
        except MonitoringError:
            return False
        return True

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self._get("/api/v1/query", params)
        if data.get("resultType") == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        data = self._get("/api/v1/query_range",
                         {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
        return [RangeSeries(r["metric"], tuple((float(t), float(v)) for t, v in r["values"])) for r in data["result"]]

    def targets(self) -> list[ScrapeTarget]:
        data = self._get("/api/v1/targets", {"state": "active"})
        out = [ScrapeTarget(t["labels"].get("job", ""), t["labels"].get("node", ""), t.get("scrapeUrl", ""),
                            t.get("health", "unknown"), t.get("lastError", ""))
               for t in data.get("activeTargets", [])]  # fmt: skip
        return sorted(out, key=lambda t: (t.node, t.job, t.url))


def direct(host: str, port: int, timeout: float = 10.0) -> Opener:
    """An opener for a Prometheus this machine reaches itself (tests on loopback)."""
    return lambda: socket.create_connection((host, port), timeout=timeout)


def _key(path: Path) -> paramiko.PKey:
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(str(path))
        except (paramiko.SSHException, ValueError):
            continue
    raise MonitoringError(f"{path} is not a usable private key", hint="use an unencrypted ed25519, ECDSA or RSA key")


def _ssh(t: hosts.Target, known_hosts: Path, timeout: float, sock: Any = None) -> paramiko.SSHClient:
    if not t.key.is_file():
        raise MonitoringError(f"cannot open a tunnel to {t.describe()}: SSH key {t.key} does not exist",
                              hint="set nodes[].ssh.key (lab: `payctl lab up -i INV` makes it)")  # fmt: skip
    client = paramiko.SSHClient()
    if known_hosts.is_file():
        client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(t.address, port=t.port, username=t.user, pkey=_key(t.key), timeout=timeout, sock=sock,
                       banner_timeout=timeout, auth_timeout=timeout, allow_agent=False, look_for_keys=False)
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise MonitoringError(f"cannot open a tunnel to {t.describe()}: {exc or type(exc).__name__}",
                              hint="check that the node is up and reachable over SSH (`payctl status`)") from exc
    return client


@contextmanager
def tunnel(inventory: Any, home: Path, node: str, address: str, port: int,
           timeout: float = 10.0) -> Iterator[PromClient]:
    """A ``PromClient`` for ``address:port`` as seen from ``node`` (over SSH, through its jump host if any)."""
    targets = hosts.targets(inventory, home)
    t = targets[node]
    known = known_hosts_path(home, inventory.deployment)
    clients: list[paramiko.SSHClient] = []
    try:
        if t.jump is not None:
            jump = _ssh(t.jump, known, timeout)
            clients.append(jump)
            transport = jump.get_transport()
            assert transport is not None
            chan = transport.open_channel("direct-tcpip", (t.address, t.port), ("127.0.0.1", 0), timeout=timeout)
            clients.append(_ssh(t, known, timeout, sock=chan))
        else:
            clients.append(_ssh(t, known, timeout))
        transport = clients[-1].get_transport()
        assert transport is not None

        def opener() -> Any:
            chan = transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout)
            chan.settimeout(timeout)
            return chan

        yield PromClient(opener, f"{address}:{port} via {node}", timeout)
    finally:
        for c in reversed(clients):
            c.close()
