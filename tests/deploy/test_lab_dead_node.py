"""node1's host dead (its sshd stopped; its services keep running) on the shared lab-2node phase-5 deployment: the
deploy lock cannot live on node1 any more. `payctl lock status` names node1 unreachable; `payctl failover db
--promote node2 --force` is refused naming node1 with the --break-lock hint; with --break-lock it runs, holding the
lock on node2 (seen there while it runs, and in node2's audit line), and node2 becomes the primary.

Runs last (order 5, after add-node's forced promotion at order 4) and leaves the deployment broken (node1 without
sshd, two writable MariaDBs): it tears it down itself (invalidate), which the session would do next anyway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.labs import PAYCTL, SharedLab

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-2node", 5, order=5)]
PREFIX = {"node1": Path("/var/lib/payctl-lab/node1"), "node2": Path("/var/lib/payctl-lab/node2")}
LOCK2 = PREFIX["node2"] / "payctl" / "lock.json"


def sql(node: str, statement: str) -> str:
    out = subprocess.run(["mariadb", f"--socket={PREFIX[node]}/run/mariadb.sock", "-uroot", "-N", "-B", "-e",
                          statement], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def ssh_answers(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=2):
            return True
    except OSError:
        return False


def stop_node1_sshd() -> int:
    """SIGTERM to node1's sshd only: the pid from its pid file, checked to be an sshd inside node1's namespace."""
    pid = int((PREFIX["node1"] / "ssh" / "sshd.pid").read_text().split()[0])
    in_ns = subprocess.run(["ip", "netns", "pids", "pl-lab-node1"], capture_output=True, text=True, check=True)
    assert str(pid) in in_ns.stdout.split(), f"pid {pid} is not in node1's namespace"
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while ssh_answers("10.77.0.11"):
        assert time.monotonic() < deadline, "node1's sshd still answers 15 s after SIGTERM"
        time.sleep(0.2)
    return pid


def test_node1_dead_failover_needs_break_lock_and_holds_the_lock_on_node2(shared_lab: SharedLab) -> None:
    try:
        if sql("node2", "SELECT @@read_only") == "0":  # add-node's forced promotion left node2 primary: node1 again
            res = shared_lab.payctl("failover", "db", "-i", "lab-2node", "--promote", "node1", "--force", "--yes")
            assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
        assert sql("node1", "SELECT @@read_only") == "0" and sql("node2", "SELECT @@read_only") == "1"
        res = shared_lab.payctl("lock", "status", "-i", "lab-2node")
        assert res.stdout.splitlines() == ["not locked (checked on node1, node2, witness)"], res.stdout + res.stderr

        pid = stop_node1_sshd()
        print(f"node1's sshd (pid {pid}) stopped; its MariaDB answers: read_only={sql('node1', 'SELECT @@read_only')}")

        res = shared_lab.payctl("lock", "status", "-i", "lab-2node")
        print(res.stdout)
        lines = res.stdout.splitlines()
        assert res.returncode == 0, res.stderr
        assert lines[0].startswith("node1 is unreachable: cannot connect to node1 (root@10.77.0.11"), lines
        assert lines[1:] == ["not locked (checked on node2, witness)",
                             "a command run now takes the lock on node2 (with --break-lock: node1 does not answer)"]

        failover = ("failover", "db", "-i", "lab-2node", "--promote", "node2", "--force", "--yes")
        res = shared_lab.payctl(*failover)
        print(res.stderr)
        assert res.returncode == 1
        err = res.stderr.splitlines()
        assert err[0].startswith("error: cannot take the deploy lock of 'lab': node1 does not answer (cannot connect")
        assert err[-1] == ("hint: if node1 is dead, retry with --break-lock: the lock is then taken on node2 "
                           "(only when no other change is in flight)")  # fmt: skip
        assert sql("node2", "SELECT @@read_only") == "1"  # refused before anything changed
        assert not LOCK2.exists()

        started = time.monotonic()
        proc = subprocess.Popen([*PAYCTL, *failover, "--break-lock"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=shared_lab.env())  # fmt: skip
        held: dict[str, str] = {}
        while proc.poll() is None and time.monotonic() - started < 600:
            if not held:
                with contextlib.suppress(OSError, ValueError):  # not there yet, or caught half-written
                    held = json.loads(LOCK2.read_text())
            time.sleep(0.05)
        out, errs = proc.communicate(timeout=30)
        took = time.monotonic() - started
        print(out, errs, f"failover with --break-lock: {took:.1f} s")
        assert proc.returncode == 0, errs[-3000:] + out[-2000:]
        assert held.get("command", "").endswith("--promote node2 --force --break-lock"), held
        assert out.splitlines()[0].startswith("node1 does not answer (cannot connect to node1")
        assert out.splitlines()[0].endswith("deploy lock taken on node2 (--break-lock)")
        assert "node2 is the MariaDB primary" in out
        assert sql("node2", "SELECT @@read_only") == "0"
        assert not LOCK2.exists()  # released
        line = json.loads((PREFIX["node2"] / "payctl" / "audit.jsonl").read_text().splitlines()[-1])
        assert line["command"] == held["command"] and line["result"] == "ok", line
        res = shared_lab.payctl("lock", "status", "-i", "lab-2node")
        assert "not locked (checked on node2, witness)" in res.stdout.splitlines(), res.stdout
    finally:
        shared_lab.invalidate()  # node1 has no sshd and both MariaDBs take writes: nobody may reuse this deployment
