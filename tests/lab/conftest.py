"""Fixtures for the lab: a real lab-2node (namespaces, bridge, sshd, cgroups) brought up once per module.

The lab uses fixed addresses (10.77.0.11-13), so test runs on one machine are serialised with a lock file, and the
finalizer always tears the lab down, even when a test failed. A bystander namespace made before `lab up` proves that
`lab down` leaves other namespaces alone.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from payctl import lab
from payctl.inventory import Inventory, load_inventory
from tests.support.labs import exclusive_lab

__all__ = ["Lab", "exclusive_lab", "ping_from"]

# An ICMP echo from inside a namespace (ping(8) is not installed on every machine): exit 0 on a reply.
PING = r"""
import os, socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
dst, ident = sys.argv[1], os.getpid() & 0xFFFF
payload = b"payctl-lab-ping!"
pkt = struct.pack("!BBHHH", 8, 0, csum(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload), ident, 1) + payload
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
s.sendto(pkt, (dst, 0))
while True:
    data, addr = s.recvfrom(2048)
    ihl = (data[0] & 0xF) * 4
    kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
    if kind == 0 and rid == ident and addr[0] == dst:
        sys.exit(0)
"""


def ping_from(namespace: str, address: str) -> bool:
    proc = subprocess.run(
        ["ip", "netns", "exec", namespace, "python3", "-c", PING, address], capture_output=True, timeout=10
    )
    return proc.returncode == 0


@dataclass(frozen=True)
class Lab:
    home: Path
    inventory: Inventory
    nodes: list[lab.NodeLayout]
    bystander: str
    up_steps: list[lab.Step]

    @property
    def key(self) -> Path:
        return lab.client_key_path(self.home)

    def ssh(self, address: str, command: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        known = self.home / self.inventory.deployment / "known_hosts"
        argv = [
            "ssh", "-i", str(key or self.key), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "-F", os.devnull, f"root@{address}", command,
        ]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def lab_2node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (CI runs them as root)")
    home = tmp_path_factory.mktemp("payctl-home")
    inv = load_inventory("lab-2node")
    with exclusive_lab():
        bystander = f"bystander-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", bystander], check=True)
        try:
            steps = lab.lab_up(inv, home)
            yield Lab(home, inv, lab.layout(inv), bystander, steps)
        finally:
            try:
                lab.lab_down(inv, home)
            finally:
                subprocess.run(["ip", "netns", "del", bystander], check=False)
