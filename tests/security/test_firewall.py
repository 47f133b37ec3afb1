"""The node firewall: loaded by apply when the inventory asks for it (default on), and what the rendered rules let
through, checked with real nftables in two throwaway network namespaces (no lab needed):

    fw-node  eth0 10.77.0.11            node1's rendered nftables.conf (lab-2node, phase 5) loaded with `nft -f`,
                                        a listener on every port of node1
    fw-out   eth0 10.77.0.1, 10.77.0.12 the public side (source 10.77.0.1) and the peer node2 (source 10.77.0.12)

The namespaces are private to the test (no link to the root namespace or the lab's bridge), so the lab's addresses
can be reused without touching it. The lab test of the loaded firewall is in tests/deploy/test_lab_apply.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payctl.cli import run
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, make_plan
from payctl.render import render
from payctl.runtimes import NodeFacts, parse_facts

# Every TCP port node1 of lab-2node uses at phase 5, plus one nobody uses.
NODE1_PORTS = sorted({22, 80, 443, 3000, 3306, 6379, 8080, 8081, 9090, 9092, 9093, 9100, 9104, 9113, 9121, 9401,
                      9402, 26379, 5555})  # fmt: skip
PUBLIC = {22, 80}
LISTEN = textwrap.dedent(
    """
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16); s.setblocking(False); sel.register(s, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            conn, _ = key.fileobj.accept(); conn.close()
    """
)
PROBE = textwrap.dedent(
    """
    import concurrent.futures, json, socket, sys
    src, dst, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
    def probe(port):
        s = socket.socket(); s.settimeout(0.7); s.bind((src, 0))
        try:
            s.connect((dst, port)); return port, True
        except OSError:
            return port, False
        finally:
            s.close()
    with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
        print(json.dumps(dict(pool.map(probe, ports))))
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Pair:
    def __init__(self, tag: str) -> None:
        self.node, self.out = f"fw-node-{tag}", f"fw-out-{tag}"

    def nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.node, "nft", *args], input=stdin, capture_output=True,
                              text=True, timeout=20)  # fmt: skip

    def reachable(self, src: str, ports: list[int]) -> dict[int, bool]:
        proc = subprocess.run(["ip", "netns", "exec", self.out, sys.executable, "-c", PROBE, src, "10.77.0.11",
                               *map(str, ports)], capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        return {int(k): v for k, v in json.loads(proc.stdout).items()}


@pytest.fixture
def pair() -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); CI runs as root")
    p = Pair(str(os.getpid()))
    listener: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", p.node)
        _ip("netns", "add", p.out)
        _ip("-n", p.node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", p.out)
        _ip("-n", p.node, "addr", "add", "10.77.0.11/24", "dev", "eth0")
        _ip("-n", p.out, "addr", "add", "10.77.0.1/24", "dev", "eth0")
        _ip("-n", p.out, "addr", "add", "10.77.0.12/24", "dev", "eth0")
        for ns in (p.node, p.out):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
        listener = subprocess.Popen(["ip", "netns", "exec", p.node, sys.executable, "-c", LISTEN,
                                     *map(str, NODE1_PORTS)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        yield p
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        for ns in (p.node, p.out):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _node1_rules() -> str:
    files = render(make_plan(load_inventory("lab-2node"), load_phase(5)))
    return files["node1/nftables.conf"].text


def test_rendered_rules_close_internal_ports_to_the_public_side_and_open_them_to_the_peer(
    pair: Pair, tmp_path: Path
) -> None:
    # Without the firewall everything answers from both sides: the probe can tell open from closed.
    assert all(pair.reachable("10.77.0.1", NODE1_PORTS).values())
    rules = tmp_path / "nftables.conf"
    rules.write_text(_node1_rules())
    loaded = pair.nft("-f", str(rules))
    assert loaded.returncode == 0, loaded.stderr
    public = pair.reachable("10.77.0.1", NODE1_PORTS)
    assert {p for p, ok in public.items() if ok} == PUBLIC, public
    peer = pair.reachable("10.77.0.12", NODE1_PORTS)
    # The peer reaches every service port; a port no service uses stays closed to it too.
    assert {p for p, ok in peer.items() if not ok} == {5555}, peer
    for name in ("mariadb", "redis", "kafka", "sentinel", "prometheus", "node_exporter", "mysqld_exporter", "app"):
        assert peer[PORTS[name]] and not public.get(PORTS[name], False), name


def test_loading_again_replaces_the_table_and_leaves_other_tables_alone(pair: Pair, tmp_path: Path) -> None:
    other = pair.nft(
        "-f", "-", stdin="table inet someone_else {\n chain c { type filter hook input priority 10; }\n}\n"
    )
    assert other.returncode == 0, other.stderr
    rules = tmp_path / "nftables.conf"
    rules.write_text(_node1_rules())
    for _ in range(2):  # the file deletes and recreates only its own table: loading twice is loading once
        assert pair.nft("-f", str(rules)).returncode == 0
    tables = pair.nft("list", "tables").stdout.split("\n")
    assert sorted(t for t in tables if t) == ["table inet payctl", "table inet someone_else"]
    assert pair.nft("list", "table", "inet", "payctl").stdout.count("chain input") == 1
    assert {p for p, ok in pair.reachable("10.77.0.1", NODE1_PORTS).items() if ok} == PUBLIC


def test_a_node_without_the_lb_opens_only_ssh_and_tls_opens_443_on_the_lb() -> None:
    files = render(make_plan(load_inventory("lab-2node"), load_phase(5)))
    assert "tcp dport { 22 } accept" in files["node2/nftables.conf"].text
    assert "elements = { 10.77.0.11, 10.77.0.13 }" in files["node2/nftables.conf"].text
    assert "tcp dport { 22, 80 } accept" in files["node1/nftables.conf"].text
    tls = load_inventory("lab-2node").model_copy(update={"tls": load_inventory("ktcloud-2node").tls})
    text = render(make_plan(tls, load_phase(5)))["node1/nftables.conf"].text
    assert "tcp dport { 22, 80, 443 } accept" in text


# --------------------------------------------------------------------------------------------- apply (dry run)


def _variant(tmp_path: Path, extra: str) -> Path:
    src = Path(__file__).resolve().parents[2] / "inventories" / "ktcloud-1node.yml"
    inv = tmp_path / "ktcloud-fw.yml"
    inv.write_text(src.read_text() + extra)
    return inv


def _no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"dry run tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_apply_loads_the_firewall_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_connect(monkeypatch)
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    assert load_inventory("ktcloud-1node").firewall.enabled and not load_inventory("lab-2node").firewall.enabled
    assert run(["phase1", "apply", "-i", "ktcloud-1node", "--dry-run"]) == 0
    out = capsys.readouterr().out
    ops = [line.strip() for line in out.splitlines()]
    # after the files are written, before the containers start: a service never listens unprotected
    assert ops.index("write nftables.conf") < ops.index("load the firewall (nft -f nftables.conf: table inet payctl)")
    assert ops.index("load the firewall (nft -f nftables.conf: table inet payctl)") < ops.index(
        "docker compose up -d --wait (recreates only changed services)"
    )
    assert "nftables" in ops
    assert "run      load the firewall (nft -f nftables.conf)" in out


def test_firewall_enabled_false_writes_the_file_but_does_not_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_connect(monkeypatch)
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path / "home"))
    inv = _variant(tmp_path, "firewall: {enabled: false}\n")
    assert not load_inventory(str(inv)).firewall.enabled
    assert run(["phase1", "apply", "-i", str(inv), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "write nftables.conf" in out and "load the firewall" not in out


def test_an_unknown_firewall_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = _variant(tmp_path, "firewall: {enable: false}\n")
    assert run(["plan", "-i", str(inv)]) == 2
    assert "firewall.enable" in capsys.readouterr().err


def test_the_loaded_firewall_is_a_fact_only_while_its_table_is_loaded() -> None:
    assert parse_facts("firewall=abc123\n").firewall == "abc123"
    assert parse_facts("migrated=x\n").firewall == "" == NodeFacts().firewall
