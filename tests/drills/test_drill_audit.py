"""The drill's audit, timeline, results table and faults, without a lab: fakes only at the seams payctl owns
(the k6 log text, the facts document the node prints, the command runner)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from payctl import drill
from payctl.cli import run
from payctl.drillaudit import DbFacts, LoadLog, Payment, Request, judge, parse_log, timeline
from payctl.drillfaults import Fault, FaultError, Node, inject
from payctl.errors import ConfigError, PayctlError
from payctl.inventory import load_inventory
from payctl.serverchecks import CommandResult

# ------------------------------------------------------------------------------------------------------ log


def test_the_log_is_parsed_and_k6_lines_are_ignored() -> None:
    log = parse_log([
        "Q 1700000000123 authorize 200",
        "A 7 dm1 5000 run-1-1",
        "Q 1700000000456 capture 503",
        'time="..." level=warning msg="Request Failed" error="connection refused"',
        "C 7 5000",
        "R 7 5000",
        "Q 1700000000500 refund x",
        "",
    ])  # fmt: skip
    assert [(r.t, r.name, r.status) for r in log.requests] == [(1700000000.123, "authorize", 200),
                                                               (1700000000.456, "capture", 503)]  # fmt: skip
    assert [(a.payment_id, a.merchant, a.amount, a.key) for a in log.authorized] == [(7, "dm1", 5000, "run-1-1")]
    assert (log.captured, log.refunded, log.unreadable) == ([7], [7], 1)
    assert (log.sent, log.acknowledged) == (2, 1)


# ------------------------------------------------------------------------------------------------------ timeline


def _reqs(spec: Sequence[tuple[float, int]]) -> list[Request]:
    return [Request(t, "authorize", s) for t, s in spec]


def test_recovery_is_the_first_clean_stretch_after_the_fault() -> None:
    ok_before = [(t / 2, 200) for t in range(0, 20)]  # 0 .. 9.5 s
    during = [(10.2, 0), (10.7, 503), (11.5, 200), (12.0, 502)]  # a success in between does not count
    after = [(12.5 + t / 2, 200) for t in range(0, 12)]  # 12.5 .. 18 s, all fine
    tl = timeline(_reqs(ok_before + during + after), fault_start=10.0, fault_end=10.0, stable_s=3.0)
    assert (tl.sent, tl.acknowledged, tl.failed_before, tl.failed_during) == (36, 33, 0, 3)
    assert tl.recovered_after_s == pytest.approx(2.5)
    assert tl.requests_during == 4  # 10.0 <= t < 12.5
    assert tl.error_rate_during == pytest.approx(0.75)


def test_successes_while_the_partition_lasts_do_not_count_as_recovered() -> None:
    reqs = [(t, 200) for t in (1, 2, 11, 12, 13, 14, 15, 16)]
    tl = timeline(_reqs(reqs), fault_start=10.0, fault_end=14.0, stable_s=2.0)
    assert tl.recovered_after_s == pytest.approx(4.0)  # 14 .. 16 is the first clean 2 s after the link came back


def test_no_clean_stretch_before_the_end_is_not_recovered() -> None:
    tl = timeline(_reqs([(1, 200), (11, 0), (12, 200), (13, 0)]), fault_start=10.0, fault_end=10.0)
    assert tl.recovered_after_s is None
    assert tl.failed_during == 2


# ------------------------------------------------------------------------------------------------------ audit


def _log() -> LoadLog:
    return parse_log(["A 1 dm1 1000 k1", "A 2 dm2 2000 k2", "A 3 dm1 3000 k3", "C 1 1000", "C 2 2000", "R 2 2000"])


def _facts(**over: object) -> DbFacts:
    base: dict[str, object] = {
        "payments": {
            1: Payment(1, "dm1", 1000, "COMPLETED", 1000, 0),
            2: Payment(2, "dm2", 2000, "REFUNDED", 2000, 2000),
            3: Payment(3, "dm1", 3000, "REQUESTED", 0, 0),
            4: Payment(4, "dm3", 4000, "REQUESTED", 0, 0),  # committed, never acknowledged: fine
        },
        "settlement_counts": (("CAPTURE", 1), ("CAPTURE", 1), ("REFUND", 1)),
        "events": 8,
    }
    base.update(over)
    return DbFacts(**base)  # type: ignore[arg-type]


def test_a_clean_run_passes_with_nothing_lost_or_duplicated() -> None:
    a = judge(_log(), _facts())
    assert a.passed, a.problems
    assert (a.lost_total, a.duplicates_total, a.payments, a.acknowledged_payments) == (0, 0, 4, 3)


def test_an_acknowledged_payment_missing_or_changed_is_lost() -> None:
    facts = _facts()
    payments = dict(facts.payments)
    del payments[3]
    payments[1] = Payment(1, "dm1", 999, "COMPLETED", 999, 0)
    payments[2] = Payment(2, "dm2", 2000, "COMPLETED", 2000, 0)  # the acknowledged refund is not there
    a = judge(_log(), _facts(payments=payments))
    assert a.lost == {**a.lost, "acknowledged payments missing": 1,
                      "acknowledged payments with another merchant or amount": 1,
                      "acknowledged refunds not refunded": 1}  # fmt: skip
    assert a.lost_total == 3 and not a.passed
    assert "lost: acknowledged payments missing: 1" in a.problems


def test_the_pipeline_must_have_settled_and_applied_everything() -> None:
    a = judge(_log(), _facts(settlement_counts=(("CAPTURE", 0), ("CAPTURE", 1), ("REFUND", 0)), unpublished=2,
                             unapplied=3, dead_letters=1))  # fmt: skip
    assert a.lost["captures not settled"] == 1
    assert a.lost["refunds not adjusted"] == 1
    assert (a.lost["events not published"], a.lost["events not applied"]) == (2, 3)
    assert a.lost["events dead-lettered or parked"] == 1
    assert a.lost_total == 8
    assert not _facts(unpublished=1).settled and _facts().settled


def test_duplicates_are_counted_by_kind() -> None:
    log = parse_log(["A 1 dm1 1000 k1", "A 1 dm1 1000 k9", "A 2 dm2 2000 k2", "A 3 dm1 3000 k3"])
    a = judge(log, _facts(keyless=2, settlement_counts=(("CAPTURE", 2), ("REFUND", 3))))
    assert a.duplicates == {
        "payments without their own idempotency key": 2,
        "payment ids acknowledged for two keys": 1,
        "captures settled more than once": 1,
        "refunds adjusted more than once": 1,
    }
    assert a.duplicates_total == 5 and not a.passed


def test_an_unbalanced_ledger_and_an_empty_run_fail_the_audit() -> None:
    assert "2 payments with an unbalanced ledger (e.g. 1, 3)" in judge(_log(), _facts(unbalanced=(1, 3))).problems
    assert "no payment was acknowledged: nothing to audit" in judge(LoadLog(), _facts()).problems


def test_facts_are_read_from_the_nodes_json_and_garbage_is_an_error() -> None:
    doc = {"payments": [[5, "dm1", 100, "COMPLETED", 100, 0]], "unbalanced": [[6, 10, 0]], "keyless": 1,
           "settlements": [["CAPTURE", 1, 1]], "events": [4, 1, 2], "dead_letters": 0, "parked": 3}  # fmt: skip
    f = DbFacts.from_json(json.dumps(doc))
    assert f.payments == {5: Payment(5, "dm1", 100, "COMPLETED", 100, 0)}
    assert (f.unbalanced, f.keyless, f.settlement_counts) == ((6,), 1, (("CAPTURE", 1),))
    assert (f.events, f.unpublished, f.unapplied, f.parked) == (4, 1, 2, 3)
    with pytest.raises(PayctlError, match="could not read the database facts"):
        DbFacts.from_json("Traceback (most recent call last): ...")


# ------------------------------------------------------------------------------------------------------ table


def _result(lost: bool = False, recovered: float | None = 2.0) -> drill.DrillResult:
    reqs = [(t / 2, 200) for t in range(40)]
    tl = timeline(_reqs(reqs), fault_start=5.0, fault_end=5.0)
    audit = judge(_log(), _facts(settlement_counts=(("CAPTURE", 0),)) if lost else _facts())
    problems = drill.verdict_problems(tl, recovered, audit, "balanced", True, 60)
    fault = Fault("node1", "kill", 5.0, 5.0, {"payctl-relay": (42,)}, "killed payctl-relay pid 42")
    return drill.DrillResult("kill-relay", "lab", 15, 20.0, fault, tl, recovered, audit, "balanced", True, 60,
                             problems)  # fmt: skip


def test_results_are_written_as_json_and_a_markdown_table(tmp_path: Path) -> None:
    good, bad, stuck = _result(), _result(lost=True), _result(recovered=None)
    assert good.passed and not bad.passed and not stuck.passed
    drill.write_results([good, bad, stuck], tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["verdict"] for r in rows] == ["pass", "FAIL", "FAIL"]
    assert (rows[0]["sent"], rows[0]["acknowledged"], rows[0]["lost"], rows[0]["duplicates"]) == (40, 40, 0, 0)
    assert rows[0]["recovered_after_s"] == 2.0 and rows[1]["lost"] == 1
    assert rows[1]["audit"]["lost"]["captures not settled"] == 1
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[2].startswith("| scenario | rate /s | duration s | requests sent | acknowledged |")
    assert "| kill-relay | 15 | 20.0 | 40 | 40 | 0 | 0.0% | 2.0 | 0 | 0 | balanced | pass |" in md
    assert "| not recovered |" in md
    assert "- kill-relay: lost: captures not settled: 1" in md


def test_recovery_beyond_the_bound_fails_the_drill() -> None:
    tl = timeline(_reqs([(1, 200), (2, 200), (12, 200), (16, 200)]), fault_start=1.5, fault_end=1.5)
    problems = drill.verdict_problems(tl, 70.0, judge(_log(), _facts()), "balanced", True, 60)
    assert problems == ("recovery took 70.0s, more than the bound of 60s",)
    problems = drill.verdict_problems(tl, 1.0, judge(_log(), _facts()), "not balanced: exit 3", False, 60)
    assert problems == (
        "reconciliation: not balanced: exit 3",
        "the deployment was not healthy after the drill (a program not RUNNING or /health not 200)",
    )


# ------------------------------------------------------------------------------------------------------ faults


class FakeRunner:
    """Records argv; answers supervisorctl status, pgrep -P and the rest from a table."""

    def __init__(self, status: str = "", children: str = "", fail: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.status = status
        self.children = children
        self.fail = fail or set()

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if "status" in argv and "supervisorctl" in argv:
            return CommandResult(0, self.status, "")
        if argv[0] == "pgrep":
            return CommandResult(0 if self.children else 1, self.children, "")
        if argv[0] == "ip" and argv[1] == "netns" and argv[2] == "list":
            return CommandResult(0, "", "")
        if " ".join(argv) in self.fail:
            return CommandResult(1, "", "Cannot find device")
        return CommandResult(0, "", "")


NODE = Node("node1", "pl-lab-node1", "/var/lib/payctl-lab/node1", "vpl-lab-node1", "10.77.0.11")
STATUS = (
    "payctl-app                       RUNNING   pid 900, uptime 0:10:00\n"
    "payctl-relay                     RUNNING   pid 910, uptime 0:10:00\n"
    "payctl-kafka                     STARTING  \n"
)


def test_kill_worker_kills_one_child_of_the_master_by_pid() -> None:
    r = FakeRunner(STATUS, "901\n902\n")
    f = inject("kill-worker", "payctl-app", NODE, r, 5)
    assert ["pgrep", "-P", "900"] in r.calls and ["kill", "-9", "901"] in r.calls
    assert f.killed == {"worker": (901,)} and f.start == f.end


def test_kill_app_kills_the_master_and_its_workers_other_programs_only_their_pid() -> None:
    r = FakeRunner(STATUS, "901\n902\n")
    inject("kill", "payctl-app", NODE, r, 5)
    assert ["kill", "-9", "900", "901", "902"] in r.calls
    r = FakeRunner(STATUS, "911\n")
    f = inject("kill", "payctl-relay", NODE, r, 5)
    assert r.calls[-1] == ["kill", "-9", "910"] and f.killed == {"payctl-relay": (910,)}
    assert r.calls[0] == ["ip", "netns", "exec", "pl-lab-node1", "supervisorctl", "-c",
                          "/var/lib/payctl-lab/node1/supervisor/supervisord.conf", "status"]  # fmt: skip


def test_a_program_that_is_not_running_is_not_killed() -> None:
    r = FakeRunner(STATUS)
    with pytest.raises(FaultError, match="node1: payctl-kafka is not running \\(STARTING\\)"):
        inject("kill", "payctl-kafka", NODE, r, 5)
    with pytest.raises(FaultError, match="payctl-redis is not running \\(not deployed\\)"):
        inject("kill", "payctl-redis", NODE, r, 5)
    assert not any(c[0] == "kill" for c in r.calls)


def test_a_partition_always_brings_the_link_back() -> None:
    r = FakeRunner()
    slept: list[float] = []
    f = inject("partition", "", NODE, r, 7, sleep=slept.append)
    assert r.calls == [["ip", "link", "set", "vpl-lab-node1", "down"], ["ip", "link", "set", "vpl-lab-node1", "up"]]
    assert slept == [7] and f.end >= f.start

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    r = FakeRunner()
    with pytest.raises(KeyboardInterrupt):
        inject("partition", "", NODE, r, 7, sleep=interrupted)
    assert r.calls[-1] == ["ip", "link", "set", "vpl-lab-node1", "up"]


# ------------------------------------------------------------------------------------------------------ plan, CLI


def test_only_lab_deployments_are_drilled() -> None:
    with pytest.raises(ConfigError, match="refusing to drill 'ktcloud-pay': drills only run on lab deployments"):
        drill.plan_drill(load_inventory("ktcloud-1node"), drill.DrillSpec("kill-app"), FakeRunner())
    with pytest.raises(ConfigError, match="the lab hosts of 'lab' are not up: no namespace pl-lab-node1"):
        drill.plan_drill(load_inventory("lab-1node"), drill.DrillSpec("kill-app"), FakeRunner())


def test_bad_drill_options_are_listed() -> None:
    with pytest.raises(ConfigError) as exc:
        drill.DrillSpec("kill-everything", rps=0, duration_s=10, warmup_s=8)
    assert exc.value.problems == [
        "SCENARIO: unknown 'kill-everything' (one of kill-app, kill-app-all, kill-relay, kill-consumer, kill-broker, "
        "kill-redis, restart-node, partition, kill-db-primary, disk-full)",
        "--rps: must be > 0",
        "--duration (10s) must exceed the warm-up (8s) by 5s+",
    ]


def test_cli_refuses_a_non_lab_inventory_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["drill", "-i", "ktcloud-1node", "kill-app", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "error: refusing to drill 'ktcloud-pay': drills only run on lab deployments (10.77.0.0/24 lab hosts)" in err
    assert "hint: bring one up with `payctl lab up -i lab-1node`" in err


def test_cli_disk_full_needs_a_load_that_outlasts_mariadbs_retry(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused while the options are read, before the inventory or any lab host is looked at.
    assert run(["drill", "-i", "lab-1node", "disk-full", "--duration", "60s", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "--duration: disk-full needs the warm-up + --fault-duration + 70s (MariaDB retries a full disk every " \
           "60 s), at least 86s" in err


class LabRunner(FakeRunner):
    """The lab's namespaces are up; node2 runs no relay (phase 5 runs one relay per deployment)."""

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = list(argv)
        if argv[:3] == ["ip", "netns", "list"]:
            self.calls.append(argv)
            return CommandResult(0, "pl-lab-witness (id: 2)\npl-lab-node2 (id: 1)\npl-lab-node1 (id: 0)\n", "")
        if "status" in argv and "supervisorctl" in argv:
            self.calls.append(argv)
            on_node2 = "pl-lab-node2" in argv
            return CommandResult(0, "payctl-app RUNNING pid 5, uptime 1:00:00\n" if on_node2 else STATUS, "")
        return super().__call__(argv, timeout)


def test_the_plan_picks_the_node_that_runs_the_program_and_a_non_lb_node_to_cut() -> None:
    inv = load_inventory("lab-2node")
    plan = drill.plan_drill(inv, drill.DrillSpec("kill-relay"), LabRunner())
    assert (plan.fault_node.name, plan.app_node.name, plan.target.url) == ("node1", "node1", "http://10.77.0.11")
    plan = drill.plan_drill(inv, drill.DrillSpec("partition", fault_s=5), LabRunner())
    assert (plan.fault_node.name, plan.fault_node.veth) == ("node2", "vpl-lab-node2")
    assert plan.describe().endswith("after 8s: cut vpl-lab-node2 (node2) for 5s; then recovery (<= 60s) and the audit")
    assert drill.plan_drill(inv, drill.DrillSpec("kill-app", node="node2"), LabRunner()).fault_node.name == "node2"
    with pytest.raises(ConfigError, match="--node: no node 'node9' in the inventory"):
        drill.plan_drill(inv, drill.DrillSpec("kill-app", node="node9"), LabRunner())
    one = drill.plan_drill(load_inventory("lab-1node"), drill.DrillSpec("partition"), LabRunner())
    assert one.fault_node.name == "node1"  # one node: the cut is on the client side of the LB


def test_the_primary_is_where_the_app_writes() -> None:
    from payctl.drilldb import primary_address

    env = "# payctl\nPAYAPP_DB_URL=mysql://app:s3cr%40t@10.77.0.12:3306/payments\nPAYAPP_HOST=10.77.0.11\n"
    assert primary_address(env) == "10.77.0.12"
    with pytest.raises(ConfigError, match="names no PAYAPP_DB_URL host"):
        primary_address("PAYAPP_HOST=10.77.0.11\n")


def test_kill_db_primary_kills_keeps_it_down_then_promotes() -> None:
    status = "payctl-mariadb                   RUNNING   pid 700, uptime 0:10:00\n"
    r = FakeRunner(status)
    order: list[str] = []

    def promote() -> str:
        order.append(" ".join(r.calls[-1]))
        return "node2 promoted"

    f = inject("failover", "payctl-mariadb", NODE, r, 5, promote=promote)
    assert r.calls[1] == ["kill", "-9", "700"]
    assert r.calls[2][-2:] == ["stop", "payctl-mariadb"]  # supervisord must not start it again
    assert order == [" ".join(r.calls[2])]  # the promotion comes after both
    assert f.killed == {"payctl-mariadb": (700,)} and f.detail == "killed payctl-mariadb pid 700; node2 promoted"


def test_disk_full_is_built_with_its_own_defaults_and_faults_the_primary() -> None:
    assert "disk-full" in drill.built() and not drill.NOT_BUILT
    d = drill.SCENARIOS["disk-full"]
    assert (d.action, d.program, d.duration_s, d.recover_bound_s) == ("disk-full", "payctl-mariadb", 100.0, 100.0)
    drill.DrillSpec("disk-full", duration_s=100, recover_bound_s=100)  # the CLI's defaults are valid

    class WithMariaDB(LabRunner):
        def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
            res = super().__call__(argv, timeout)
            if "status" in argv and "pl-lab-node1" in argv:
                return CommandResult(0, res.stdout + "payctl-mariadb RUNNING pid 7, uptime 1:00:00\n", "")
            return res

    plan = drill.plan_drill(load_inventory("lab-2node"), drill.DrillSpec("disk-full", duration_s=100), WithMariaDB())
    assert plan.fault_node.name == "node1"  # where the app writes (its app.env) or else the first MariaDB node
    assert "MariaDB's binlog on node1 onto a 256 KiB tmpfs, full for 8s, then grown" in plan.describe()


def test_the_status_codes_during_the_fault_are_counted() -> None:
    reqs = _reqs([(1, 200), (10.5, 503), (11, 503), (11.2, 0), (12, 409), (12.5, 503)]
                 + [(13 + t / 2, 200) for t in range(10)])  # fmt: skip
    tl = timeline(reqs, fault_start=10.0, fault_end=12.8)
    assert tl.statuses_during == ((503, 3), (0, 1), (409, 1))
    assert tl.statuses_text == "503: 3, 0: 1, 409: 1"
    assert timeline(_reqs([(1, 200)]), fault_start=10.0, fault_end=10.0).statuses_text == "-"
