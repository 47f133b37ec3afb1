"""``prom.tunnel`` against a real sshd on loopback and the real Prometheus of the ``stack`` fixture: direct, and
through a jump host (``via``), as ``payctl status`` reaches a monitoring node whose port is not public."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from payctl.prom import MonitoringError, tunnel
from tests.monitoring.conftest import Stack
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class _Ssh:
    user: str
    port: int
    key: Path

    def key_path(self, home: Path | None = None) -> Path:
        return self.key


@dataclass(frozen=True)
class _Node:
    name: str
    public_address: str | None
    private_address: str
    via: str | None
    ssh: _Ssh


@dataclass(frozen=True)
class _Inventory:
    deployment: str
    nodes: tuple[_Node, ...]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nStrictModes no\nAllowTcpForwarding yes\n")  # fmt: skip
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=(d / "sshd.log").open("wb"))  # fmt: skip
    try:
        wait_until(lambda: (d / "sshd.pid").exists(), 10, "sshd")
        yield port, d / "client"
    finally:
        proc.terminate()
        proc.wait(10)


def _inventory(port: int, key: Path) -> _Inventory:
    ssh = _Ssh("root", port, key)
    return _Inventory("tunnel-test", (_Node("n1", None, "127.0.0.1", None, ssh),
                                      _Node("n2", None, "127.0.0.1", "n1", ssh)))  # fmt: skip


@pytest.mark.parametrize("node", ["n1", "n2"])  # n2 is reached through n1
def test_prometheus_through_the_tunnel(stack: Stack, sshd: tuple[int, Path], tmp_path: Path, node: str) -> None:
    inv = _inventory(*sshd)
    with tunnel(inv, tmp_path, node, "127.0.0.1", stack.prometheus_port) as client:
        assert len(client.targets()) == 2
        # The targets API can say "up" a moment before the scrape's samples are queryable (the full suite once saw
        # no up{job="payapp"} series here, on a loaded machine): wait for the series, then read it.
        try:
            wait_until(lambda: bool(client.query('up{job="payapp"}')), 30, "up{job=payapp} queryable", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: up={client.query('up')}, targets={client.targets()}") from None
        assert client.query('up{job="payapp"}')[0].value == 1.0


def test_a_closed_port_behind_the_tunnel_is_a_clear_error(sshd: tuple[int, Path], tmp_path: Path) -> None:
    with tunnel(_inventory(*sshd), tmp_path, "n1", "127.0.0.1", free_port()) as client:
        assert not client.ready()
        with pytest.raises(MonitoringError, match="cannot reach Prometheus"):
            client.query("up")


def test_a_missing_key_names_the_node(sshd: tuple[int, Path], tmp_path: Path) -> None:
    with pytest.raises(MonitoringError, match=r"n1 .*does not exist"), \
            tunnel(_inventory(sshd[0], tmp_path / "nope"), tmp_path, "n1", "127.0.0.1", 9090):
        pass
