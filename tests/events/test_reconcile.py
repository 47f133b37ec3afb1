"""Reconciliation on real MariaDB: balanced after settlement, and it can fail, naming the payment."""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime
from typing import Any

from payapp import db
from payapp.consumer import apply_event
from payapp.events import connect, parse_event
from payapp.reconcile import _IN_SCOPE, business_window, claim_hour
from tests.events.conftest import Api, Pipeline, mixed_load


def test_business_day_is_seoul_midnight_to_midnight_cut_at_the_settle_lag() -> None:
    now = datetime(2026, 11, 25, 16, 30)  # 01:30 on the 26th in Seoul
    today = business_window(now, "Asia/Seoul", 60)
    assert today.report_date == date(2026, 11, 26)
    assert (today.start, today.end) == (datetime(2026, 11, 25, 15, 0), datetime(2026, 11, 25, 16, 29))
    closed = business_window(now, "Asia/Seoul", 60, date(2026, 11, 25))
    assert (closed.start, closed.end) == (datetime(2026, 11, 24, 15, 0), datetime(2026, 11, 25, 15, 0))
    assert business_window(now, "UTC", 0).start == datetime(2026, 11, 25, 0, 0)


async def _settle_everything(p: Pipeline) -> None:
    conn = await connect(p.db_url)
    try:
        for topic, payload in p.sql("SELECT topic, payload FROM outbox_event WHERE topic <> 'payment.settled'"):
            await apply_event(conn, parse_event(topic, payload))
    finally:
        conn.close()


async def test_reconcile_balanced_then_names_a_corrupted_ledger_and_a_dropped_settlement(
    pipeline: Pipeline, api: Api
) -> None:
    p = pipeline
    await mixed_load(api, 8)
    await _settle_everything(p)
    ok = p.payapp("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "balanced=true" in ok.stdout and "captures=8 " in ok.stdout

    # One ledger row without its pair (the append-only trigger forbids editing one, so corruption is an insert).
    corrupt = p.sql("SELECT payment_id, operation_id FROM payment_operation WHERE kind = 'CAPTURE' LIMIT 1")[0]
    p.sql(f"INSERT INTO ledger_entry (payment_id, operation_id, account, direction, amount, currency, created_at)"
          f" VALUES ({corrupt[0]}, {corrupt[1]}, 'merchant_payable', 'DEBIT', 1, 'KRW', UTC_TIMESTAMP(6))")
    bad = p.payapp("reconcile")
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "balanced=false" in bad.stdout and f"mismatched={corrupt[0]}" in bad.stdout
    report = p.sql("SELECT is_balanced, total_debit - total_credit, unbalanced_payments, mismatched_payment_ids"
                   " FROM reconciliation_report ORDER BY report_id DESC LIMIT 1")
    assert report == [["0", "1", "1", corrupt[0]]]

    # A dropped settlement (the trigger has to go first: settlement is append-only too) is named as well.
    dropped = p.sql(f"SELECT payment_id FROM settlement WHERE kind = 'CAPTURE' AND payment_id <> {corrupt[0]}"
                    " LIMIT 1")[0][0]
    p.sql(f"DROP TRIGGER settlement_no_delete; DELETE FROM settlement WHERE payment_id = {dropped}"
          " AND kind = 'CAPTURE' ORDER BY settlement_id LIMIT 1")
    worse = p.payapp("reconcile")
    assert worse.returncode == 3
    row = p.sql("SELECT missing_settlements, settlement_mismatches, mismatched_payment_ids FROM reconciliation_report"
                " ORDER BY report_id DESC LIMIT 1")[0]
    assert row[0] == "1" and row[1] == "1"
    assert sorted(row[2].split(","), key=int) == sorted([corrupt[0], dropped], key=int)
    # Each run emitted reconciliation.completed through the outbox.
    assert p.scalar("SELECT COUNT(*) FROM outbox_event WHERE topic = 'reconciliation.completed'") == 3


async def test_settle_lag_keeps_in_flight_captures_out_of_judgement(pipeline: Pipeline, api: Api) -> None:
    p = pipeline
    pid = await api.authorize(1000)
    await api.capture(pid)  # nobody settles it
    fresh = p.payapp("reconcile", PAYAPP_RECONCILE_SETTLE_LAG_S="60")
    assert fresh.returncode == 0 and "captures=0 " in fresh.stdout, fresh.stdout
    judged = p.payapp("reconcile", PAYAPP_RECONCILE_SETTLE_LAG_S="0")
    assert judged.returncode == 3 and f"mismatched={pid}" in judged.stdout, judged.stdout


async def test_each_hour_is_claimed_by_exactly_one_node(pipeline: Pipeline) -> None:
    conns = [await connect(pipeline.db_url) for _ in range(4)]
    try:
        wins = await asyncio.gather(*(claim_hour(c, "2026-11-25T14") for c in conns))
        assert sorted(wins) == [False, False, False, True]
        assert await claim_hour(conns[0], "2026-11-25T15")
        assert not await claim_hour(conns[1], "2026-11-25T14")  # an old hour is never run again
    finally:
        for c in conns:
            c.close()


async def test_manual_run_waits_for_a_running_one(pipeline: Pipeline) -> None:
    p = pipeline
    holder = await connect(p.db_url)
    try:
        await db.execute(holder, "SELECT GET_LOCK('payapp.reconcile', 0)")
        proc = p.start("reconcile")
        await asyncio.sleep(3)
        assert proc.poll() is None  # waiting behind the running reconciliation
        await db.execute(holder, "SELECT RELEASE_LOCK('payapp.reconcile')")
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.2)
        assert proc.returncode == 0
        assert "report " in p.log_of(proc)
    finally:
        holder.close()


async def test_two_schedulers_write_one_report_per_day_for_the_hour(pipeline: Pipeline) -> None:
    """Both run `reconcile --schedule` with the hour's minute already reached: one of them claims the hour."""
    p = pipeline
    procs = [p.start("reconcile", "--schedule", name=f"sched{i}", PAYAPP_RECONCILE_MINUTE="0") for i in range(2)]
    deadline = time.monotonic() + 30
    while p.scalar("SELECT COUNT(*) FROM reconciliation_report") == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    await asyncio.sleep(2)
    for proc in procs:
        proc.terminate()
    assert [proc.wait(20) for proc in procs] == [0, 0]
    # One report per business day (two only in the first hour of a day, which also closes the previous one).
    rows = p.sql("SELECT report_date, COUNT(*), MIN(trigger_kind) FROM reconciliation_report GROUP BY report_date")
    assert rows and all(n == "1" and kind == "schedule" for _, n, kind in rows), rows
    printed = [sum(line.startswith("report ") for line in p.log_of(proc).splitlines()) for proc in procs]
    assert sorted(printed)[0] == 0 and sorted(printed)[1] == len(rows)


async def test_reconcile_date_ranges_and_argument_errors(pipeline: Pipeline) -> None:
    p = pipeline
    days = p.payapp("reconcile", "--from", "2026-11-01", "--to", "2026-11-03")
    assert days.returncode == 0, days.stderr
    assert [line.split()[2] for line in days.stdout.splitlines()] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    one = p.payapp("reconcile", "--date", "2026-10-31")
    assert one.returncode == 0 and " 2026-10-31 balanced=true" in one.stdout
    both = p.payapp("reconcile", "--date", "2026-10-31", "--from", "2026-11-01", "--to", "2026-11-02")
    assert both.returncode == 2
    assert both.stderr.startswith("payapp: error: give either --date or --from/--to")
    backwards = p.payapp("reconcile", "--from", "2026-11-03", "--to", "2026-11-01")
    assert backwards.returncode == 2 and "--from is after --to" in backwards.stderr


async def test_the_schedule_outlives_a_database_outage_and_reconciles_when_it_is_back(pipeline: Pipeline) -> None:
    """payctl-reconcile is a long-running program: a refused connection, then its connection killed by the server,
    must not end it (supervisord gives up on a program that keeps exiting); the hour is reconciled once it can."""
    from payapp.events import load_event_settings
    from payapp.reconcile import schedule

    p = pipeline
    s = load_event_settings(environ={**p.env(), "PAYAPP_RECONCILE_MINUTE": "0"})
    attempts: list[str] = []

    async def flaky_connect() -> Any:
        attempts.append("connect")
        if len(attempts) <= 2:
            raise OSError(111, "Connection refused")  # the primary restarting
        conn = await connect(p.db_url)
        if len(attempts) == 3:
            conn_id = (await db.execute(conn, "SELECT CONNECTION_ID()")).rows[0][0]
            p.mariadb.sql(f"KILL CONNECTION {int(conn_id)}")  # and this one dies under it
        return conn

    stop = asyncio.Event()
    task = asyncio.create_task(schedule(flaky_connect, s, stop, every_s=0.05))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not p.sql("SELECT 1 FROM reconciliation_report LIMIT 1"):
        await asyncio.sleep(0.1)
    stop.set()
    reports = await asyncio.wait_for(task, 10)
    assert len(attempts) >= 4, attempts
    assert [r.is_balanced for r in reports] == [True], reports
    assert p.scalar("SELECT COUNT(*) FROM reconciliation_report WHERE trigger_kind = 'schedule'") == 1


def test_the_hourly_window_is_read_through_the_created_at_indexes(pipeline: Pipeline) -> None:
    """Migration 004: reconciliation reads one window of payment_operation and ledger_entry by created_at through an
    index (a range), not by scanning tables that grow with every payment. EXPLAIN of the queries reconcile sends."""
    window = "'2026-11-25 14:00:00', '2026-11-25 15:00:00'"
    queries = {
        "payment_operation": _IN_SCOPE.replace("%s", "{}").format(*window.split(", ")),
        "ledger_entry": "SELECT payment_id FROM ledger_entry WHERE created_at >= {} AND created_at < {}"
                        " GROUP BY payment_id".format(*window.split(", ")),
    }  # fmt: skip
    for table, query in queries.items():
        plan = pipeline.sql(f"EXPLAIN {query}")
        header, row = ["id", "select_type", "table", "type", "possible_keys", "key"], plan[0]
        got = dict(zip(header, row[:6], strict=True))
        assert got["table"] == table and got["type"] == "range", (query, plan)
        assert got["key"] == {"payment_operation": "ix_operation_created", "ledger_entry": "ix_ledger_created"}[table]
