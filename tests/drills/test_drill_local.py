"""The drill's load script, log and database audit end to end on loopback: a real ``payapp serve`` (MariaDB, Redis),
the real k6 running ``loadtest/drill.js``, a worker killed with SIGKILL during the load, the real ``FACTS_SCRIPT``
against the database. No relay or consumer runs here, so the audit must report the events as unpublished and the
captures as unsettled (it must be able to fail), while nothing acknowledged is missing or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from payctl import drill, lock
from payctl.drillaudit import DbFacts, facts_argv, judge, parse_log
from payctl.drillfaults import Node
from payctl.gate import check_target
from tests.app.conftest import make_env, new_database, start_serve
from tests.support.runners import LoopbackRunner
from tests.support.services import MariaDB, Redis

pytestmark = pytest.mark.slow


def _facts(env_file: Path, prefix: str) -> DbFacts:
    res = subprocess.run(facts_argv(sys.executable, str(env_file), prefix), capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return DbFacts.from_json(res.stdout)


def test_acknowledged_payments_are_found_and_the_missing_pipeline_is_reported(
    mariadb: MariaDB, redis_server: Redis, tmp_path: Path
) -> None:
    db = new_database(mariadb, "drill")
    env = make_env(db.url, redis_server.url())
    env_file = tmp_path / "app.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    server = start_serve(env, tmp_path / "serve.log", workers=2).wait_ready()
    try:
        prefix = "dtestm"
        log_path = tmp_path / "k6.log"
        cmd, k6env = drill.k6_invocation(server.url, 10, 6.0, prefix, log_path)
        k6 = subprocess.Popen(cmd, env=k6env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(3)
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)  # the master starts another; the client retries what got no answer
        _, err = k6.communicate(timeout=60)
        assert k6.returncode == 0, err.decode()
    finally:
        server.stop()
    log = parse_log(log_path.read_text().splitlines())
    assert log.sent >= 60 and len(log.authorized) >= 40 and log.captured and not log.unreadable
    facts = _facts(env_file, prefix)
    audit = judge(log, facts)
    assert set(facts.payments) >= {a.payment_id for a in log.authorized}
    assert all(p.merchant.startswith(prefix) for p in facts.payments.values())
    assert audit.duplicates_total == 0 and facts.unbalanced == ()
    captures = sum(1 for kind, _ in facts.settlement_counts if kind == "CAPTURE")
    assert captures >= len(set(log.captured))
    # Without relay and consumer: every event unpublished and unapplied, every capture unsettled.
    assert facts.events > 0 and facts.unpublished == facts.events and not facts.settled
    assert {k: v for k, v in audit.lost.items() if v} == {
        "captures not settled": captures,
        **({"refunds not adjusted": audit.lost["refunds not adjusted"]} if audit.lost["refunds not adjusted"] else {}),
        "events not published": facts.events,
        "events not applied": facts.unapplied,
    }
    # A payment that no idempotency key points at (a double write) and has no ledger is caught.
    mariadb.sql(
        "INSERT INTO payment (payment_id, merchant_id, amount, currency, status, created_at, updated_at) "
        f"VALUES (999999999, '{prefix}1', 100, 'KRW', 'REQUESTED', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        db=db.name,
    )
    again = judge(log, _facts(env_file, prefix))
    assert again.duplicates["payments without their own idempotency key"] == 1
    assert "1 payments with an unbalanced ledger (e.g. 999999999)" in again.problems


def _local_shell(_: str) -> Callable[[str], tuple[bool, str, str]]:
    def shell(cmd: str) -> tuple[bool, str, str]:
        p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30, check=False)
        return p.returncode == 0, p.stdout, p.stderr

    return shell


def test_a_whole_drill_on_loopback_kills_a_worker_and_reports_what_it_saw(
    mariadb: MariaDB, redis_server: Redis, tmp_path: Path
) -> None:
    """run_drill end to end (load, fault at the warm-up, recovery, drain, audit, lock and audit line) with the lab
    replaced at the runner seam; no relay/consumer here, so the drill must fail on the unsettled pipeline."""
    db = new_database(mariadb, "drillrun")
    env = make_env(db.url, redis_server.url())
    prefix = tmp_path / "node1"
    prefix.mkdir()
    (prefix / "venv").symlink_to(Path(sys.executable).parent.parent)  # the node's venv is this one
    (prefix / "app.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    server = start_serve(env, tmp_path / "serve.log", workers=1).wait_ready()
    try:
        node = Node("node1", "pl-test-node1", str(prefix), "vpl-test-node1", "127.0.0.1")
        spec = drill.DrillSpec("kill-app", rps=10, duration_s=12, warmup_s=4, recover_bound_s=20, drain_bound_s=4)
        plan = drill.DrillPlan("test", spec, check_target(server.url, None), (node,), node, node)
        runner = LoopbackRunner(server.proc.pid)
        before = server.worker_pids()
        result = drill.run_drill(plan, tmp_path / "report", runner=runner, shell_for=_local_shell,
                                 audit_home=tmp_path / "home", command="drill kill-app")  # fmt: skip
    finally:
        server.stop()
    assert ["kill", "-9", str(before[0])] in runner.calls  # the worker, by the pid its master has
    assert result.fault.killed == {"worker": (before[0],)}
    tl = result.timeline
    assert tl.sent >= 100 and tl.failed_before == 0 and tl.recovered_after_s is not None
    assert result.services_recovered_after_s is not None and result.healthy_after
    assert result.audit.lost["acknowledged payments missing"] == 0 and result.audit.duplicates_total == 0
    assert result.audit.lost["captures not settled"] > 0 and not result.passed
    assert any(p.startswith("lost: events not published:") for p in result.problems)
    assert not Path(lock.lock_path(str(prefix))).exists()  # taken for the drill (the audit line went next to it)
    assert (prefix / "payctl" / "audit.jsonl").is_file()
    line = json.loads((tmp_path / "home" / "test" / "audit.jsonl").read_text().splitlines()[-1])
    assert (line["command"], line["result"]) == ("drill kill-app", "failed")
    assert "captures not settled" in line["error"]
