"""``payctl.sentinels``: asking real Sentinels (three, on loopback, with payctl's ACL users) whether they agree on the
master, through the same node seam ``scale add-node`` uses over SSH (here a local shell)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from payctl.failover import RedisNode
from payctl.sentinels import SentinelError, SentinelView, agreed, parse_master, wait_agreed
from tests.scale.conftest import LocalIO
from tests.scale.test_redis_sentinel import SENTINEL_PW, Cluster, cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def _nodes(c: Cluster, work: Path) -> list[RedisNode]:
    work.mkdir(exist_ok=True)
    return [RedisNode(f"s{i}", "127.0.0.1", port, str(work), LocalIO()) for i, port in enumerate(c.sentinel_ports)]


def test_parse_master_pairs_lines() -> None:
    assert parse_master("name\npayctl\nip\n10.77.0.11\nport\n6379\nquorum\n2\n") == {
        "name": "payctl", "ip": "10.77.0.11", "port": "6379", "quorum": "2"}  # fmt: skip


def test_agreed_needs_every_sentinel_to_see_the_others() -> None:
    ok = [SentinelView(f"s{i}", "10.0.0.1:6379", 2, 2, 1, "master") for i in range(3)]
    assert agreed(ok, {"10.0.0.1:6379"}, 2)
    assert not agreed(ok, {"10.0.0.2:6379"}, 2)  # another master
    assert not agreed(ok, {"10.0.0.1:6379"}, 3)  # another quorum
    assert not agreed([*ok[:2], SentinelView("s2", "10.0.0.1:6379", 2, 1, 1, "master")], {"10.0.0.1:6379"}, 2)
    assert not agreed([*ok[:2], SentinelView("s2", "", error="refused")], {"10.0.0.1:6379"}, 2)
    assert not agreed([*ok[:2], SentinelView("s2", "10.0.0.1:6379", 2, 2, 1, "master,s_down")], {"10.0.0.1:6379"}, 2)
    assert not agreed([], {"10.0.0.1:6379"}, 2)
    # Any node of the deployment may be the master (a failover is what Sentinels are for), but all must name it.
    moved = [SentinelView(f"s{i}", "10.0.0.2:6379", 2, 2, 1, "master") for i in range(3)]
    assert agreed(moved, {"10.0.0.1:6379", "10.0.0.2:6379"}, 2)
    assert not agreed([*ok[:2], moved[2]], {"10.0.0.1:6379", "10.0.0.2:6379"}, 2)


def test_three_real_sentinels_agree(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    # wait_agreed checks master, quorum and the other Sentinels; a Sentinel learns the replica from the master's
    # INFO (every 10 s), so on a loaded machine one may not list it yet (seen once in a full run): ask again.
    deadline = time.monotonic() + 30
    while True:
        views = wait_agreed(_nodes(cluster, tmp_path / "w"), "sentinel", SENTINEL_PW, "payctl",
                            [f"127.0.0.1:{cluster.master_port}"], 2, timeout_s=30)  # fmt: skip
        if all(v.replicas == 1 for v in views) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [v.master for v in views] == [f"127.0.0.1:{cluster.master_port}"] * 3
    assert [(v.quorum, v.other_sentinels, v.replicas) for v in views] == [(2, 2, 1)] * 3
    assert views[0].describe().startswith(f"s0: master 127.0.0.1:{cluster.master_port} (master), quorum 2, ")
    assert list((tmp_path / "w").iterdir()) == []  # the password file is removed after each question


def test_a_wrong_expectation_or_a_dead_sentinel_is_named(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    nodes = _nodes(cluster, tmp_path / "w")
    with pytest.raises(SentinelError, match=r"did not agree on master 127\.0\.0\.1:\d+ \(quorum 3\)"):
        wait_agreed(nodes, "sentinel", SENTINEL_PW, "payctl", [f"127.0.0.1:{cluster.master_port}"], 3, timeout_s=1)
    with pytest.raises(
        SentinelError, match=r"s1: redis `SENTINEL master payctl` failed: NOPERM.* AUTH failed: WRONGPASS"
    ):
        wait_agreed(nodes[:2], "sentinel", "wrong", "payctl", [f"127.0.0.1:{cluster.master_port}"], 2, timeout_s=0)
    # A Sentinel that is not running: its line says so, the others still answer.
    dead = RedisNode("gone", "127.0.0.1", 1, str(tmp_path / "w"), LocalIO())
    with pytest.raises(SentinelError) as info:
        wait_agreed([*nodes, dead], "sentinel", SENTINEL_PW, "payctl", [f"127.0.0.1:{cluster.master_port}"], 2,
                    timeout_s=0)  # fmt: skip
    assert "; gone: redis `SENTINEL master payctl` failed: Could not connect" in info.value.message
    assert f"s0: master 127.0.0.1:{cluster.master_port}" in info.value.message


def test_sentinels_follow_a_failover(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """After the master dies they agree again, on the promoted replica (what the lab test then checks per node)."""
    os.kill(cluster.master.proc.pid, signal.SIGKILL)
    cluster.master.proc.wait(10)
    views = wait_agreed(_nodes(cluster, tmp_path / "w"), "sentinel", SENTINEL_PW, "payctl",
                        [f"127.0.0.1:{cluster.replica_port}"], 2, timeout_s=60)  # fmt: skip
    assert {v.master for v in views} == {f"127.0.0.1:{cluster.replica_port}"}
