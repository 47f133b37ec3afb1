"""`payctl scale add-node` on the lab: from a running 1-node deployment (lab-1node, phase 1) to node2 added while a
bounded load loop sends payments through nginx. No failed payment; every acknowledged payment is on node2's replica;
nginx serves from both nodes (each app's own /metrics counts the authorizations it served)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from payctl import lab
from payctl.cli import run
from payctl.inventory import load_inventory
from tests.lab.conftest import exclusive_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODE1 = Path("/var/lib/payctl-lab/node1")
NODE2 = Path("/var/lib/payctl-lab/node2")
LB = "http://10.77.0.11"


def sql(prefix: Path, statement: str) -> str:
    out = subprocess.run(["mariadb", f"--socket={prefix}/run/mariadb.sock", "-uroot", "-N", "-B", "-e", statement],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def authorize(merchant: str) -> tuple[int, str]:
    body = {"merchantId": merchant, "amount": 1000, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex}
    req = urllib.request.Request(f"{LB}/payments/authorize", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, str(json.loads(resp.read()).get("paymentId", ""))
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()[:200]


@dataclass
class Load:
    """At most `limit` payments at about `rps` per second, each result recorded (bounded in count and time)."""

    rps: float = 20
    limit: int = 20000
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        start = time.monotonic()
        for i in range(self.limit):
            if self.stop.is_set() or time.monotonic() - start > 900:
                return
            try:
                code, detail = authorize(f"m-scale-{i % 20}")
            except OSError as exc:
                code, detail = 0, repr(exc)
            (self.acked if code in (200, 201) else self.failed).append(
                detail if code in (200, 201) else f"{code} {detail}"
            )
            delay = start + (i + 1) / self.rps - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def served(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}:8080/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("payapp_http_requests_total{") and 'method="POST"' in line and "authorize" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def lab_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (CI runs them as root)")
    home = tmp_path_factory.mktemp("payctl-home")
    inv = load_inventory("lab-2node")
    old = os.environ.get("PAYCTL_HOME")
    os.environ["PAYCTL_HOME"] = str(home)
    with exclusive_lab():
        try:
            lab.lab_up(inv, home)
            yield home
        finally:
            try:
                lab.lab_down(inv, home)
            finally:
                if old is None:
                    os.environ.pop("PAYCTL_HOME", None)
                else:
                    os.environ["PAYCTL_HOME"] = old


def test_add_node_under_load(lab_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["phase1", "apply", "-i", "lab-1node", "--yes", "--no-verify"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert authorize("m-scale-warm")[0] in (200, 201)
    with Load() as load:
        time.sleep(3)
        rc = run(["scale", "add-node", "-i", "lab-2node", "--node", "node2", "--yes"])
        out = capsys.readouterr()
        time.sleep(5)
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    assert "node2 added to deployment lab" in out.out
    assert re.search(r"node2: replica of node1 at GTID 0-\d+-\d+, semi-sync clients 1, seeded now", out.out), out.out
    assert load.failed == [], load.failed[:5]
    assert len(load.acked) > 50
    # Every acknowledged payment is on node2's replica (semi-sync AFTER_SYNC; catch-up is waited for anyway).
    pos = sql(NODE1, "SELECT @@gtid_binlog_pos")
    assert sql(NODE2, f"SELECT MASTER_GTID_WAIT('{pos}', 30)") == "0"
    ids = ",".join(str(int(p)) for p in load.acked)
    count = sql(NODE2, f"SELECT COUNT(*) FROM payments.payment WHERE payment_id IN ({ids})")
    assert int(count) == len(load.acked)
    assert sql(NODE2, "SELECT @@read_only") == "1"
    # The app's accounts reached the replica (through replication: the snapshot holds none), for a later failover.
    assert int(sql(NODE2, "SELECT COUNT(*) FROM mysql.user WHERE User = 'app'")) >= 2
    # nginx now sends to both app nodes.
    before = served("10.77.0.12")
    for i in range(20):
        assert authorize(f"m-scale-after-{i}")[0] in (200, 201)
    assert served("10.77.0.12") > before and served("10.77.0.11") > 0


def test_planned_switchover_under_load(lab_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After add-node: node2 becomes primary under load, node1 its replica; every acknowledged payment is on both;
    payments succeed again after the switch (during it, writes may fail fast as read-only and be retried)."""
    with Load() as load:
        time.sleep(3)
        rc = run(["failover", "db", "-i", "lab-2node", "--promote", "node2", "--planned", "--yes"])
        out = capsys.readouterr()
        time.sleep(3)
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    assert "node2 is the MariaDB primary" in out.out
    assert sql(NODE2, "SELECT @@read_only") == "0" and sql(NODE1, "SELECT @@read_only") == "1"
    status = sql(NODE1, "SHOW SLAVE STATUS")
    assert "10.77.0.12" in status and "Slave_Pos" in status
    assert len(load.acked) > 50
    pos = sql(NODE2, "SELECT @@gtid_binlog_pos")
    assert sql(NODE1, f"SELECT MASTER_GTID_WAIT('{pos}', 30)") == "0"
    ids = ",".join(str(int(p)) for p in load.acked)
    for prefix in (NODE1, NODE2):
        assert int(sql(prefix, f"SELECT COUNT(*) FROM payments.payment WHERE payment_id IN ({ids})")) == len(load.acked)
    # Writes go to node2 now, through either app node.
    results = [authorize(f"m-switch-after-{i}")[0] for i in range(20)]
    assert all(code in (200, 201) for code in results), results
    print(f"switchover under load: {len(load.acked)} acknowledged, {len(load.failed)} failed: {load.failed[:3]}")
