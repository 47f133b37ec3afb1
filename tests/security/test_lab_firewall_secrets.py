"""On the session's shared lab deployment (lab-1node, phase 4): the firewall apply loaded is in force inside the
node's namespace, and no secret ever shows in an output of a lab run or in the process list during an apply.

The root namespace (10.77.0.1) is the lab's public side: with the firewall on (a copy of the inventory turns it on;
the bundled lab inventories keep it off), only SSH and HTTP answer there. The secrets test makes the
apply redo its secret-bearing steps (users SQL, migrations, app restarts) by removing the node's
records of them, samples `ps -eo args` all along, then also runs status, logs and a short verify (a report), and
greps all of it, the audit lines, the reports and every log on the node for every value in the secrets file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path

import pytest
import yaml

from payctl import lab
from payctl.inventory import resolve_inventory_path
from payctl.plan import PORTS
from payctl.secrets import secrets_path
from tests.support.labs import SharedLab

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-1node", 4)]

ADDRESS = "10.77.0.11"
INTERNAL = ["mariadb", "redis", "kafka", "kafka_controller", "app", "prometheus", "node_exporter", "mysqld_exporter",
            "redis_exporter", "nginx_exporter", "relay_metrics", "consumer_metrics"]  # fmt: skip
# Trees under the prefix that hold data or installed software, not configuration or output.
NOT_SCANNED = {"data", "releases", "current", "venv", "wheelhouse", "kafka/lib"}
PROBE = """
import json, socket, sys
out = {}
for port in map(int, sys.argv[2:]):
    s = socket.socket(); s.settimeout(1.0)
    out[port] = s.connect_ex((sys.argv[1], port)) == 0
    s.close()
print(json.dumps(out))
"""


def _open_from_root(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((ADDRESS, port)) == 0


def _open_inside(namespace: str, ports: list[int]) -> dict[int, bool]:
    proc = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, ADDRESS, *map(str, ports)],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


def _prefix(shared_lab: SharedLab) -> Path:
    return Path(shared_lab.inventory.node_prefix("node1"))


def test_an_inventory_with_the_firewall_on_loads_it_in_the_node_and_closes_internal_ports_to_the_public_side(
    shared_lab: SharedLab, tmp_path: Path
) -> None:
    # The bundled lab inventories keep the firewall off (other lab tests reach internal ports from the root
    # namespace); the same deployment applied with a copy that turns it on must load it, and a second look at that
    # inventory must find nothing to do.
    inventory = tmp_path / "lab-1node-firewall.yml"
    text = resolve_inventory_path(shared_lab.name).read_text()
    assert "firewall: {enabled: false}" in text
    inventory.write_text(text.replace("firewall: {enabled: false}", "firewall: {enabled: true}"))
    namespace = lab.layout(shared_lab.inventory)[0].namespace
    prefix = _prefix(shared_lab)
    try:
        applied = shared_lab.payctl("phase4", "apply", "-i", str(inventory), "--yes", "--no-verify")
        assert applied.returncode == 0, applied.stdout[-3000:] + applied.stderr
        assert "run      load the firewall (nft -f nftables.conf)" in applied.stdout
        again = shared_lab.payctl("phase4", "apply", "-i", str(inventory), "--dry-run")
        assert again.returncode == 0, again.stderr
        assert "firewall loaded (table inet payctl)  (no change)" in again.stdout
        table = subprocess.run(["ip", "netns", "exec", namespace, "nft", "list", "table", "inet", "payctl"],
                               capture_output=True, text=True, timeout=20)  # fmt: skip
        assert table.returncode == 0, table.stderr
        assert "policy drop" in table.stdout and "tcp dport { 22, 80 } accept" in table.stdout
        # The lab is namespaces: the machine's own ruleset never gets payctl's table.
        root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=20)
        assert "payctl" not in root.stdout
        loaded = (prefix / "payctl" / "firewall.applied").read_text().strip()
        assert loaded == hashlib.sha256((prefix / "nftables.conf").read_bytes()).hexdigest()
        ports = sorted({PORTS[name] for name in INTERNAL})
        # Every internal service answers inside the node (so "closed" below is the firewall, not a dead service) ...
        inside = _open_inside(namespace, ports)
        assert all(inside.values()), inside
        # ... and none from the public side, where only SSH and HTTP answer.
        public = {port: _open_from_root(port) for port in [22, 80, *ports]}
        assert {p for p, ok in public.items() if ok} == {22, 80}, public
        with urllib.request.urlopen(f"http://{ADDRESS}/health", timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        # Back to what the bundled inventory deploys, for the next users of the shared deployment.
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "delete", "table", "inet", "payctl"],
                       capture_output=True, timeout=20)  # fmt: skip
        (prefix / "payctl" / "firewall.applied").unlink(missing_ok=True)
    assert all(_open_from_root(port) for port in (PORTS["mariadb"], PORTS["prometheus"]))


class PsSampler(threading.Thread):
    """`ps -eo args` as often as it can run (bounded: stops when asked or after 15 minutes)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.lines: set[str] = set()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 900
        while not self.done.is_set() and time.monotonic() < deadline:
            out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
            self.lines.update(out.splitlines())
            self.samples += 1

    def stop(self) -> None:
        self.done.set()
        self.join(60)


def _texts_under(root: Path, skip: Collection[str] = ()) -> dict[str, tuple[str, int]]:
    """path -> (text, mode) of every regular file under root (outside ``skip``), read as text with replacement."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if str(rel / d).removeprefix("./") not in skip]
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(path)] = (path.read_bytes().decode(errors="replace"), stat.S_IMODE(st.st_mode))
    return out


def test_no_secret_in_any_output_log_report_or_process_list_of_a_lab_run(shared_lab: SharedLab) -> None:
    doc = yaml.safe_load(secrets_path(shared_lab.home, shared_lab.inventory.deployment).read_text())
    secrets = {name: value for name, value in doc["secrets"].items()}
    assert len(secrets) >= 9 and all(len(v) >= 20 for v in secrets.values())
    prefix = _prefix(shared_lab)
    # Make the apply redo the steps that handle secrets: the users SQL, the migrations (the app programs restart).
    for record in ("users.applied", "migrated"):
        (prefix / "payctl" / record).unlink()
    sampler = PsSampler()
    sampler.start()
    try:
        applied = shared_lab.payctl("phase4", "apply", "-i", shared_lab.name, "--yes", "--no-verify")
    finally:
        sampler.stop()
    outputs = {"apply": applied.stdout + applied.stderr}
    assert applied.returncode == 0, outputs["apply"][-3000:]
    for step in ("apply mariadb/users.sql", "payapp migrate"):
        assert step in applied.stdout, applied.stdout[-3000:]
    assert sampler.samples >= 20, sampler.samples
    # The sampler saw the apply's own commands on the node (so it sampled while the work ran).
    assert any("mariadb --socket" in line or "payapp migrate" in line for line in sampler.lines)
    reports = shared_lab.home / "secrets-test-report"
    for name, argv in {
        "status": ["status", "-i", shared_lab.name, "--json"],
        "logs": ["logs", "-i", shared_lab.name, "-n", "200"],
        "verify": ["verify", "-i", shared_lab.name, "--rps", "5", "--duration", "3s", "--warmup", "1s", "--quiet",
                   "--report-dir", str(reports)],
    }.items():  # fmt: skip
        proc = shared_lab.payctl(*argv)
        # verify may judge the short run against the phase's gate (exit 1); its output and report still count
        assert proc.returncode in ((0, 1) if name == "verify" else (0,)), (name, proc.stdout[-2000:], proc.stderr)
        outputs[name] = proc.stdout + proc.stderr
    texts = {f"output of payctl {k}": (v, 0) for k, v in outputs.items()}
    texts.update({"ps -eo args": ("\n".join(sorted(sampler.lines)), 0)})
    # Local state: audit lines, reports, calibration, crash logs ... (not the secrets file or the lab's SSH key).
    home = {p: t for p, t in _texts_under(shared_lab.home).items()
            if Path(p) != secrets_path(shared_lab.home, shared_lab.inventory.deployment)
            and "wheelhouse" not in p and "bundles" not in p and not p.endswith(("id_ed25519", ".tar"))}  # fmt: skip
    assert any(p.endswith("audit.jsonl") for p in home) and any(p.endswith("report.md") for p in home), sorted(home)
    texts.update(home)
    node = _texts_under(prefix, NOT_SCANNED)
    logs = {p: t for p, t in node.items() if p.startswith(str(prefix / "logs")) or "/nginx/logs/" in p
            or p.endswith(".jsonl")}  # fmt: skip
    assert any(p.endswith("supervisord.log") for p in logs) and any(p.endswith("payctl-app.log") for p in logs)
    texts.update(logs)
    leaks = [f"{name} in {where}" for where, (text, _) in texts.items() for name, v in secrets.items() if v in text]
    assert leaks == []
    # On the node, a file that holds a secret (rendered configs) is readable by root only.
    holders = {p: mode for p, (text, mode) in node.items() if any(v in text for v in secrets.values())}
    assert str(prefix / "app.env") in holders  # the scan does find secrets where they belong
    assert {p: oct(m) for p, m in holders.items() if m & 0o077} == {}
