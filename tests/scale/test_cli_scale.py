"""`payctl scale add-node`: the dry run shows the ordered steps with their undo and contacts no host (ktcloud
inventories: the fake connector); refusals are usage errors (exit 2) with the message and hint a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from payctl import scale
from payctl.cli import run


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    return tmp_path


def test_dry_run_lists_the_steps_in_order(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    rc = run(["scale", "add-node", "-i", "ktcloud-2node", "--node", "node2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert lines[0] == "add node2 to deployment ktcloud-pay (primary node1, LB node1):"
    steps = [line for line in lines if line[:2] in {f"{i}." for i in range(1, 10)}]
    assert [s.split("]")[0] for s in steps] == ["1. [node1", "2. [node2", "3. [node2", "4. [node1", "5. [node1",
                                                "6. [node1", "7. [node1", "8. [node1, node2, witness"]  # fmt: skip
    assert steps[1].startswith("2. [node2] deploy node2 and witness (phase 5 apply limited to them)")
    assert "Sentinels on node2 and witness" in steps[1]
    assert (
        "MASTER_USE_GTID=slave_pos on node2" in steps[2] and "--single-transaction --master-data=1 --gtid" in steps[2]
    )
    assert "semi-sync AFTER_SYNC (1000 ms timeout)" in steps[2]
    assert "nginx on node1: upstreams node1, node2, nginx -t, graceful reload" in steps[4]
    assert steps[5].startswith("6. [node1] phase 5 apply on every node: node1 gains its Sentinel, app.env with the "
                               "Sentinels and both Kafka brokers")  # fmt: skip
    assert steps[6] == ("7. [node1] Kafka: node2 and witness join the KRaft quorum (kafka-metadata-quorum "
                        "add-controller); every topic (__consumer_offsets included) reassigned to RF 2 on node1, "
                        "node2, then the topics' min.insync.replicas 2")  # fmt: skip
    assert steps[7] == ("8. [node1, node2, witness] wait until the 3 Sentinels name the same Redis master (planned: "
                        "node1; a failover the converge causes may move it), quorum 2, each seeing the other 2"
                        )  # fmt: skip
    assert sum(line.startswith("undo: ") for line in lines) == 8
    assert lines[-1] == "dry run: nothing changed"
    # Nothing was written: no secrets were generated for a dry run.
    assert not (home / "ktcloud-pay").exists()


def test_phase5_apply_adds_a_missing_node_through_scale(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    """``payctl phase5 apply`` on a running 1-node deployment goes through ``scale add-node``. Whether node2 is new
    is read from the hosts (``scale.growth``, exercised in the lab test); here that seam answers "node2" to add."""
    asked: list[tuple[str, bool]] = []

    def pending(inv: object, home_: Path, *, dry_run: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        asked.append((str(home_), dry_run))
        return ("node2",), ()

    monkeypatch.setattr(scale, "growth", pending)
    rc = run(["phase5", "apply", "-i", "ktcloud-2node", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert asked == [(str(home.absolute()), True)]
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert lines[0] == "node2 not running yet: payctl phase5 apply adds it with payctl scale add-node"
    assert "add node2 to deployment ktcloud-pay (primary node1, LB node1):" in lines
    assert lines[-1] == "dry run: nothing changed"
    # --only (one component's files) never turns into adding a node.
    asked.clear()
    run(["phase5", "apply", "-i", "ktcloud-2node", "--dry-run", "--only", "app"])
    assert asked == []


def test_a_fresh_phase5_apply_deploys_the_first_node_then_adds_the_others(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    """Nothing runs yet (``scale.growth`` answers node2 as fresh): a plain phase-5 apply would give node2 an empty,
    unreplicated database and an observer controller, so the CLI applies phase 4 (the first node only) and then
    adds node2 with scale add-node. Seams: the engine's apply and add-node (both exercised in the lab tests)."""
    from payctl import deploy
    from payctl.cli import apply as cli_apply
    from payctl.cli import scale as cli_scale

    calls: list[str] = []

    def fake_apply(req: deploy.ApplyRequest, hooks: object) -> deploy.ApplyResult:
        calls.append(f"apply phase {req.phase}")
        return deploy.ApplyResult(deploy.Preview(req.inventory.deployment, req.phase, False, []), applied=True)

    monkeypatch.setattr(scale, "growth", lambda *a, **k: ((), ("node2",)))
    monkeypatch.setattr(cli_apply.deploy, "apply", fake_apply)
    monkeypatch.setattr(cli_scale, "add_node_cmd", lambda inv, node, dry, yes: calls.append(f"add-node {node}"))
    rc = run(["phase5", "apply", "-i", "ktcloud-2node", "--yes", "--no-verify"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert calls == ["apply phase 4", "add-node node2"]
    assert out.splitlines()[0] == "fresh deployment: phase 4 on the first node, then payctl scale add-node adds node2"


def test_phase5_dry_run_of_a_fake_deployment_asks_no_host(home: Path) -> None:
    from payctl.inventory import load_inventory

    assert scale.growth(load_inventory("ktcloud-2node"), home, dry_run=True) == ((), ())


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["-i", "ktcloud-2node", "--node", "nodeX", "--dry-run"],
         "error: node 'nodeX' is not in the inventory (it has node1, node2, witness)",
         "hint: add the node to the inventory first (docs/inventory.md)"),
        (["-i", "ktcloud-2node", "--node", "node1", "--dry-run"],
         "error: node1 is the primary/LB node of this deployment, not a node to add",
         "hint: pass the node the running deployment does not have yet (e.g. --node node2)"),
        (["-i", "ktcloud-2node", "--node", "witness", "--dry-run"],
         "error: witness carries no app and MariaDB in phase 5: scale add-node adds an app node",
         "hint: check the node's roles in the inventory"),
        (["-i", "ktcloud-2node", "--node", "node2"],
         "error: payctl scale add-node changes hosts and asks first, but stdin is not a terminal",
         "hint: add --yes to apply without asking, or --dry-run to only see the steps"),
    ],
)  # fmt: skip
def test_refusals_exit_2(argv: list[str], message: str, hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["scale", "add-node", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [message, hint]


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["--promote", "node2"], "error: pass exactly one of --planned and --force",
         "hint: --planned when the primary is alive, --force when it is gone"),
        (["--promote", "node2", "--planned", "--force"], "error: pass exactly one of --planned and --force",
         "hint: --planned when the primary is alive, --force when it is gone"),
        (["--promote", "node2", "--planned"],
         "error: payctl failover db changes hosts and asks first, but stdin is not a terminal",
         "hint: add --yes to go ahead without asking"),
    ],
)  # fmt: skip
def test_failover_db_usage_exit_2(argv: list[str], message: str, hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["failover", "db", "-i", "ktcloud-2node", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [message, hint]


def test_failover_redis_refused_with_a_witness(capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["failover", "redis", "-i", "ktcloud-2node", "--promote", "node2", "--yes"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [
        "error: this deployment has a witness: its three Sentinels fail Redis over by themselves",
        "hint: check `SENTINEL get-master-addr-by-name payctl` on a Sentinel instead",
    ]
