"""`payctl upgrade` and `payctl rollback` on the shared lab-2node deployment (phase 5: nginx on node1 balances over
node1 and node2), each under a bounded payment loop through nginx at 10.77.0.11 (about 20/s):

1. upgrade to a copy of payapp versioned 0.1.1 (PAYCTL_APP_SOURCE): every node switches release, 0 failed requests;
2. a release whose /health always answers 503: node2 (first in the order) is rolled back automatically, the command
   exits 1 naming the node, node1 is not touched, 0 failed requests;
3. `payctl rollback`: every node back to the release it had at the start, 0 failed requests; the failed and the
   rolled-back releases are gone; a phase 5 re-apply of that release then changes nothing and adds no release.

The tests run in file order on one deployment and leave it as they found it (the release it was made with current).
payctl runs as a subprocess, like the shared deployment's own apply: the same code reads the same secrets file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from payctl.wheelhouse import source_files
from tests.support.labs import SharedLab
from tests.support.loads import Load

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-2node", 5, order=1)]

REPO = Path(__file__).resolve().parents[2]
PREFIX = {"node1": Path("/var/lib/payctl-lab/node1"), "node2": Path("/var/lib/payctl-lab/node2")}
NGINX_CONF = PREFIX["node1"] / "nginx" / "nginx.conf"
START: dict[str, str] = {}  # the release current on each node before the first test


def current(node: str) -> str:
    return os.readlink(PREFIX[node] / "current").rsplit("/", 1)[-1]


def on_node(node: str) -> list[str]:
    return sorted(p.name for p in (PREFIX[node] / "releases").iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_copy(tmp: Path, version: str, *, break_health: bool = False) -> Path:
    """A copy of payapp's source with another version (and, for the bad release, a /health that is always 503)."""
    dest = tmp / f"app-{version}"
    for src in source_files(REPO / "app"):
        target = dest / src.relative_to(REPO / "app")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    assert 'version = "0.1.0"' in text
    pyproject.write_text(text.replace('version = "0.1.0"', f'version = "{version}"'))
    if break_health:
        api = dest / "payapp" / "api.py"
        code = api.read_text()
        probe = "db_ok = await _probe(database(), 2.0)"
        assert probe in code
        api.write_text(code.replace(probe, "db_ok = await _probe(database(), 2.0) and False  # the broken release"))
    return dest


def node_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("node1: ", "node2: "))]


def test_upgrade_under_load_has_no_failed_request(
    shared_lab: SharedLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    START.update({n: current(n) for n in PREFIX})
    nginx_before = digest(NGINX_CONF)
    monkeypatch.setenv("PAYCTL_APP_SOURCE", str(app_copy(tmp_path, "0.1.1")))
    with Load(limit=8000, max_s=300, merchant="m-upgrade", settle_s=1) as load:
        out = shared_lab.payctl("upgrade", "-i", "lab-2node", "--yes")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    print(out.stdout)
    print(f"upgrade under load: {len(load.acked)} acknowledged, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert len(load.acked) > 100
    for node in ("node2", "node1"):  # the node order: node1 (LB and primary) last
        now = current(node)
        assert now != START[node] and now.split("-")[0] > START[node].split("-")[0]
        assert f"{node}: {START[node]} -> {now}, drain " in out.stdout
        assert list((PREFIX[node] / "current" / "lib").glob("python3*/site-packages/payapp-0.1.1.dist-info"))
        assert START[node] in on_node(node)  # kept for rollback
    assert [line[:5] for line in node_lines(out.stdout)] == ["node2", "node1"]
    assert digest(NGINX_CONF) == nginx_before  # the LB's file is back byte for byte
    audit = [json.loads(line) for line in (shared_lab.home / "lab" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["command"] == "payctl upgrade -i lab-2node" and audit[-1]["result"] == "ok"


def test_a_release_that_fails_its_health_check_is_rolled_back_on_the_first_node(
    shared_lab: SharedLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {n: current(n) for n in PREFIX}
    kept = {n: on_node(n) for n in PREFIX}
    nginx_before = digest(NGINX_CONF)
    monkeypatch.setenv("PAYCTL_APP_SOURCE", str(app_copy(tmp_path, "0.1.2", break_health=True)))
    with Load(limit=8000, max_s=300, merchant="m-upgrade", settle_s=1) as load:
        out = shared_lab.payctl("upgrade", "-i", "lab-2node", "--yes", "--health-timeout", "10")
    assert out.returncode == 1, out.stderr[-3000:] + out.stdout[-3000:]
    print(out.stderr)
    err = " ".join(out.stderr.split())
    assert "error: upgrade stopped at node2: " in err and "was not healthy within 10s" in err, err
    assert f"node2 runs {good['node2']} again and is back in the load balancer" in err, err
    assert "nodes after node2 were not touched" in err
    print(f"failed release under load: {len(load.acked)} acknowledged, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert {n: current(n) for n in PREFIX} == good
    assert {n: on_node(n) for n in PREFIX} == kept  # the failed release was deleted from node2
    assert digest(NGINX_CONF) == nginx_before
    audit = json.loads((shared_lab.home / "lab" / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["result"] == "failed" and "upgrade stopped at node2" in audit["error"]


def test_rollback_returns_every_node_to_its_previous_release_and_apply_then_changes_nothing(
    shared_lab: SharedLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert START, "runs after the upgrade test"
    monkeypatch.setenv("PAYCTL_APP_SOURCE", str(shared_lab.app_source))  # the release the deployment was made with
    upgraded = {n: current(n) for n in PREFIX}
    with Load(limit=8000, max_s=300, merchant="m-upgrade", settle_s=1) as load:
        out = shared_lab.payctl("rollback", "-i", "lab-2node", "--yes")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    print(out.stdout)
    print(f"rollback under load: {len(load.acked)} acknowledged, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert {n: current(n) for n in PREFIX} == START
    for node in PREFIX:
        assert f"{node}: {upgraded[node]} -> {START[node]}" in out.stdout
        assert upgraded[node] not in on_node(node)  # the release left behind is deleted
    # The release the deployment was made with is current again: a phase apply has nothing to do, installs no release.
    releases_before = {n: on_node(n) for n in PREFIX}
    out = shared_lab.payctl("phase5", "apply", "-i", "lab-2node", "--yes", "--no-verify")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 5 on deployment lab: nothing to change" in out.stdout, out.stdout[-3000:]
    assert {n: on_node(n) for n in PREFIX} == releases_before
