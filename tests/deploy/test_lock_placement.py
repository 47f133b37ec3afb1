"""Where the deploy lock lives when a node is dead: on the first node that answers, only with --break-lock when an
earlier node does not answer; a lock left on a later node is seen and refused (or broken). The lock's commands run
in a real /bin/sh against per-node prefixes under tmp_path; the fake is the per-node opener (``payctl.lock.Opener``,
``payctl.hosts.node_shells`` in the CLI tests): a "dead" node's opener raises what a refused SSH connection raises."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from payctl import hosts, lock
from payctl.cli import run
from payctl.errors import DeployError, LockHeld, LockNodeDown
from tests.deploy.test_units import local_shell

NODES = ("node1", "node2", "witness")


def nodes(tmp_path: Path) -> list[tuple[str, str]]:
    return [(n, str(tmp_path / n)) for n in NODES]


def opener(dead: set[str], opened: list[str] | None = None) -> lock.Opener:
    def open_shell(node: str) -> lock.Shell:
        if opened is not None:
            opened.append(node)
        if node in dead:
            raise DeployError(f"cannot connect to {node} (root@10.77.0.x:22): [Errno 111] Connection refused")
        return local_shell

    return open_shell


def lock_file(tmp_path: Path, node: str) -> Path:
    return Path(lock.lock_path(str(tmp_path / node)))


# ------------------------------------------------------------------------------------------------ lock.take


def test_the_lock_is_on_the_first_node_and_a_second_take_names_its_holder(tmp_path: Path) -> None:
    first = lock.take(nodes(tmp_path), opener(set()), lock.new_info("lab", "payctl phase5 apply -i lab-2node"))
    assert (first.node, first.down, first.broken) == ("node1", {}, [])
    assert lock_file(tmp_path, "node1").exists() and not lock_file(tmp_path, "node2").exists()
    with pytest.raises(LockHeld) as err:
        lock.take(nodes(tmp_path), opener(set()), lock.new_info("lab", "payctl failover db"))
    assert err.value.message.startswith("deployment 'lab' is locked on node1: ")
    assert "running `payctl phase5 apply -i lab-2node` since" in err.value.message
    assert lock.give_back(first) is True
    assert not lock_file(tmp_path, "node1").exists()


def test_a_dead_first_node_refuses_without_break_lock_naming_it_and_the_next_node(tmp_path: Path) -> None:
    opened: list[str] = []
    with pytest.raises(LockNodeDown) as err:
        lock.take(nodes(tmp_path), opener({"node1"}, opened), lock.new_info("lab", "payctl failover db"))
    assert err.value.message == (
        "cannot take the deploy lock of 'lab': node1 does not answer (cannot connect to node1 (root@10.77.0.x:22): "
        "[Errno 111] Connection refused); the lock lives on the first node that answers"
    )
    assert err.value.hint == (
        "if node1 is dead, retry with --break-lock: the lock is then taken on node2 "
        "(only when no other change is in flight)"
    )
    assert opened == ["node1", "node2"]  # the witness was not even asked
    assert not any(lock_file(tmp_path, n).exists() for n in NODES)


def test_break_lock_takes_it_on_the_next_node_and_breaks_a_stale_lock_there(tmp_path: Path) -> None:
    stale = lock.new_info("lab", "payctl failover redis (killed)")
    lock.acquire(local_shell, str(tmp_path / "node2"), stale, node="node2")
    mine = lock.new_info("lab", "payctl failover db --break-lock")
    taken = lock.take(nodes(tmp_path), opener({"node1"}), mine, break_lock=True)
    assert taken.node == "node2" and list(taken.down) == ["node1"]
    assert taken.broken == [("node2", stale)]
    assert lock.status(local_shell, str(tmp_path / "node2")) == mine
    # While it is held there, a command that sees node1 dead and one that sees it back are both refused.
    with pytest.raises(LockNodeDown, match="node1 does not answer"):
        lock.take(nodes(tmp_path), opener({"node1"}), lock.new_info("lab", "x"))
    with pytest.raises(LockHeld) as err:
        lock.take(nodes(tmp_path), opener(set()), lock.new_info("lab", "payctl phase5 apply"))
    assert "is locked on node2:" in err.value.message and "taken there while node1 did not answer" in err.value.message
    assert not lock_file(tmp_path, "node1").exists()  # the refused command let go of node1's lock again
    assert lock.give_back(taken) is True
    assert not lock_file(tmp_path, "node2").exists()


def test_node1_back_with_stale_locks_on_both_break_lock_removes_them(tmp_path: Path) -> None:
    old1 = lock.new_info("lab", "payctl phase5 apply (host died)")
    old2 = lock.new_info("lab", "payctl failover db --break-lock (killed)")
    lock.acquire(local_shell, str(tmp_path / "node1"), old1, node="node1")
    lock.acquire(local_shell, str(tmp_path / "node2"), old2, node="node2")
    taken = lock.take(nodes(tmp_path), opener(set()), lock.new_info("lab", "apply --break-lock"), break_lock=True)
    assert taken.node == "node1" and taken.broken == [("node1", old1), ("node2", old2)]
    assert not lock_file(tmp_path, "node2").exists()
    lock.give_back(taken)


def test_no_node_answers(tmp_path: Path) -> None:
    with pytest.raises(LockNodeDown, match="no node answers"):
        lock.take(nodes(tmp_path), opener(set(NODES)), lock.new_info("lab", "x"), break_lock=True)


def test_survey_and_placement(tmp_path: Path) -> None:
    held = lock.new_info("lab", "payctl failover db")
    lock.acquire(local_shell, str(tmp_path / "node2"), held, node="node2")
    view = lock.survey(nodes(tmp_path), opener({"node1"}))
    assert [(v.node, v.info, bool(v.down)) for v in view] == [
        ("node1", None, True), ("node2", held, False), ("witness", None, False)
    ]  # fmt: skip
    where = lock.placement(view)
    assert where is not None and where.node == "node2"


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """lab-2node with its prefixes under tmp_path (the lock's shell is this machine's /bin/sh)."""
    text = (Path(__file__).resolve().parents[2] / "inventories" / "lab-2node.yml").read_text()
    path = tmp_path / "lab-2node.yml"
    path.write_text(text.replace("/var/lib/payctl-lab", str(tmp_path)))
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path / "home"))
    return path


def fake_nodes(monkeypatch: pytest.MonkeyPatch, dead: set[str]) -> None:
    @contextmanager
    def node_shells(inventory: Any, home: Path, **_: Any) -> Iterator[lock.Opener]:
        yield opener(dead)

    monkeypatch.setattr(hosts, "node_shells", node_shells)


def test_lock_status_names_the_dead_node_and_where_the_lock_is(
    inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes(monkeypatch, {"node1"})
    assert run(["lock", "status", "-i", str(inventory)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "node1 is unreachable: cannot connect to node1 (root@10.77.0.x:22): [Errno 111] Connection refused",
        "not locked (checked on node2, witness)",
        "a command run now takes the lock on node2 (with --break-lock: node1 does not answer)",
    ]
    held = lock.new_info("lab", "payctl failover db --break-lock")
    lock.acquire(local_shell, str(tmp_path / "node2"), held, node="node2")
    fake_nodes(monkeypatch, set())  # node1 back: the lock left on node2 still shows, and release removes it
    assert run(["lock", "status", "-i", str(inventory)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"locked on node2 by {held.describe()} (not the first node that answers: node1)"
    ]
    assert run(["lock", "release", "-i", str(inventory), "--yes"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"released the lock of {held.describe()} on node2"]
    assert not lock_file(tmp_path, "node2").exists()


FAILOVER: list[list[str]] = [
    ["failover", "db", "--promote", "node2", "--force", "--yes"],
    ["failover", "db", "--promote", "node2", "--planned", "--yes"],
]


@pytest.mark.parametrize("argv", FAILOVER)
def test_failover_is_refused_when_node1_is_dead_and_no_break_lock(
    argv: list[str], inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake_nodes(monkeypatch, {"node1"})
    assert run([*argv[:2], "-i", str(inventory), *argv[2:]]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot take the deploy lock of 'lab': node1 does not answer (cannot connect to node1 "
        "(root@10.77.0.x:22): [Errno 111] Connection refused); the lock lives on the first node that answers",
        "hint: if node1 is dead, retry with --break-lock: the lock is then taken on node2 (only when no other change "
        "is in flight)",
    ]
    assert not any(lock_file(tmp_path, n).exists() for n in NODES)
    assert not (tmp_path / "home" / "lab" / "audit.jsonl").exists()  # refused before anything was done


def test_failover_waits_for_an_apply_holding_the_lock(
    inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes(monkeypatch, set())
    apply = lock.new_info("lab", "payctl phase5 apply -i lab-2node")
    lock.acquire(local_shell, str(tmp_path / "node1"), apply, node="node1")
    assert run(["failover", "db", "-i", str(inventory), "--promote", "node2", "--force", "--yes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: deployment 'lab' is locked on node1: {apply.describe()[:40]}")
    assert lock.status(local_shell, str(tmp_path / "node1")) == apply


def test_failover_with_break_lock_holds_the_lock_on_node2_and_audits_there(
    inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the lock, the failover itself needs the deployment's secrets (absent here): it fails, and that failure is
    audited on node2 under the lock it held, which is released."""
    fake_nodes(monkeypatch, {"node1"})
    seen: list[bool] = []
    from payctl import dbroles

    real: Callable[..., Any] = dbroles._failover_db

    def spy(*args: Any) -> Any:
        seen.append(lock_file(tmp_path, "node2").exists())
        return real(*args)

    monkeypatch.setattr(dbroles, "_failover_db", spy)
    rc = run(["failover", "db", "-i", str(inventory), "--promote", "node2", "--force", "--yes", "--break-lock"])
    out = capsys.readouterr()
    assert rc == 1
    assert out.err.startswith("error: deployment 'lab' already runs on its hosts but the secrets file is missing")
    assert seen == [True]
    assert out.out.splitlines()[0].startswith("node1 does not answer (cannot connect to node1")
    assert out.out.splitlines()[0].endswith("deploy lock taken on node2 (--break-lock)")
    assert not lock_file(tmp_path, "node2").exists()
    line = json.loads((tmp_path / "node2" / "payctl" / "audit.jsonl").read_text().splitlines()[-1])
    assert line["command"].endswith("--promote node2 --force --break-lock") and line["result"] == "failed"
    assert line["error"].startswith("deployment 'lab' already runs on its hosts but the secrets file is missing")
    assert line["nodes"] == ["node1", "node2"]
    local = (tmp_path / "home" / "lab" / "audit.jsonl").read_text().splitlines()
    assert json.loads(local[-1])["command"] == line["command"]
