"""Command-line glue of the event pipeline: ``payapp relay | consume | lag | reconcile | dlq list|replay|requeue``.

Registered in ``payapp.cli.COMMANDS``; like it, this module parses and prints and the core modules never do.
The Kafka settings come from the same environment and ``--env-file`` (``payapp.events.EventSettings``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any, TypeVar

from payapp.errors import ConfigError
from payapp.events import EventSettings, load_event_settings
from payapp.settings import Settings
from payapp.watchdog import start_drain_watchdog

Subparsers = Any
T = TypeVar("T")
EXIT_UNBALANCED = 3
EXIT_STOP_OVERRAN = 4  # still running STOP_DEADLINE_S after SIGTERM: the watchdog ended it
STOP_DEADLINE_S = 25.0


def _events(args: argparse.Namespace) -> EventSettings:
    return load_event_settings(getattr(args, "env_file", None))


def _until_signal(work: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``work(stop)``; SIGTERM and SIGINT set ``stop`` so it finishes its round and exits cleanly, and arm a
    watchdog: a process not gone ``STOP_DEADLINE_S`` later exits with EXIT_STOP_OVERRAN (logged), before
    supervisord's SIGKILL (stopwaitsecs 30) and whatever a client library still waits for."""

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if not stop.is_set():
                stop.set()
                start_drain_watchdog(STOP_DEADLINE_S, EXIT_STOP_OVERRAN)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping)
        return await work(stop)

    return asyncio.run(main())


def add_relay(sub: Subparsers) -> None:
    p = sub.add_parser("relay", help="publish the outbox to Kafka (one active relay; others stand by)",
                       description="Publish unpublished outbox rows in order with acks=all, keyed by paymentId. "
                                   "Only the holder of the relay lease publishes; a standby takes over when it "
                                   "expires. SIGTERM finishes the round and releases the lease.")
    p.set_defaults(handler=_relay)


def _relay(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.relay import serve_relay

    s = _events(args)
    s.require_bootstrap()
    state = _until_signal(lambda stop: serve_relay(settings.db_url, s, stop))
    print(f"relay stopped: published {state.published} events in {state.rounds} rounds", file=sys.stderr)
    return 0


def add_consume(sub: Subparsers) -> None:
    p = sub.add_parser("consume", help="apply payment events: settlements, adjustments, dead letters",
                       description="Consume the payment topics in group PAYAPP_KAFKA_GROUP; each polled batch is "
                                   "applied in one MariaDB transaction (deduplicated by eventId), offsets are "
                                   "committed after it.")
    p.set_defaults(handler=_consume)


def _consume(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.consumer import serve_consumer

    s = _events(args)
    s.require_bootstrap()
    st = _until_signal(lambda stop: serve_consumer(settings.db_url, s, stop, settings.host))
    print(f"consumer stopped: applied {st.applied}, duplicates {st.duplicates}, parked {st.parked}, "
          f"dead letters {st.dead}", file=sys.stderr)
    return 0


def add_lag(sub: Subparsers) -> None:
    p = sub.add_parser("lag", help="consumer lag per partition (end offsets minus the group's committed offsets)")
    p.set_defaults(handler=_lag)


def _lag(args: argparse.Namespace, settings: Settings) -> int:
    from aiokafka.errors import KafkaError

    from payapp.errors import PayappError
    from payapp.events import consumer_lag

    try:
        lag = asyncio.run(asyncio.wait_for(consumer_lag(_events(args)), 60))
    except (KafkaError, OSError, TimeoutError) as exc:
        raise PayappError(f"cannot read consumer lag: {exc!r}", "check PAYAPP_KAFKA_BOOTSTRAP and the brokers") from exc
    for tp, n in sorted(lag.per_partition.items()):
        print(f"{tp}\t{n}")
    print(f"total\t{lag.total}")
    return 0


def add_reconcile(sub: Subparsers) -> None:
    p = sub.add_parser("reconcile", help="reconcile a business day; exit 3 when unbalanced",
                       description="Reconcile the current business day (PAYAPP_RECONCILE_TZ) up to now minus the "
                                   "settle lag, or --date D, or each day --from A --to B; with --schedule, run "
                                   "hourly on the node that claims the hour.")
    p.add_argument("--date", type=date.fromisoformat, default=None, help="business day YYYY-MM-DD")
    p.add_argument("--from", dest="date_from", type=date.fromisoformat, default=None)
    p.add_argument("--to", dest="date_to", type=date.fromisoformat, default=None)
    p.add_argument("--schedule", action="store_true", help="run hourly until SIGTERM")
    p.set_defaults(handler=_reconcile)


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.events import connect
    from payapp.reconcile import Report, run_once, schedule

    s = _events(args)
    if args.date and (args.date_from or args.date_to):
        raise ConfigError("give either --date or --from/--to", "e.g. --from 2026-11-01 --to 2026-11-07")
    if bool(args.date_from) != bool(args.date_to):
        raise ConfigError("--from and --to go together")
    days: list[date | None] = [args.date]
    if args.date_from:
        n = (args.date_to - args.date_from).days
        if n < 0:
            raise ConfigError("--from is after --to")
        days = [args.date_from + timedelta(days=i) for i in range(n + 1)]

    async def work(stop: asyncio.Event) -> list[Report]:
        if args.schedule:
            return await schedule(lambda: connect(settings.db_url), s, stop)
        conn = await connect(settings.db_url)
        try:
            return [await run_once(conn, s, day=d) for d in days]
        finally:
            conn.close()

    reports = _until_signal(work)
    for r in reports:
        shown = r.mismatched_payment_ids
        ids = ",".join(str(i) for i in shown[:20]) + (f",...({len(shown)} in all)" if len(shown) > 20 else "")
        ids = ids or "-"
        print(f"report {r.report_id} {r.window.report_date} balanced={str(r.is_balanced).lower()} "
              f"debit={r.total_debit} credit={r.total_credit} payments={r.payments_checked} "
              f"captures={r.captures_checked} mismatched={ids}")
    return 0 if all(r.is_balanced for r in reports) else EXIT_UNBALANCED


def add_dlq(sub: Subparsers) -> None:
    p = sub.add_parser("dlq", help="list, replay or requeue dead letters (and the events parked behind them)")
    actions = p.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="open dead letters")
    ls.add_argument("--all", action="store_true", help="include resolved ones")
    ls.set_defaults(handler=_dlq_list)
    rp = actions.add_parser("replay", help="re-process dead letters, then the events parked behind them")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--event-id", help="an eventId (or a dead-letter id)")
    which.add_argument("--all", action="store_true", help="every open dead letter, oldest first")
    rp.set_defaults(handler=_dlq_replay)
    rq = actions.add_parser(
        "requeue", help="put the relay's dead letters (outbox rows of a topic it did not know) back into the outbox",
        description="For dead letters with source outbox-relay:<eventId>: mark the outbox row unpublished again "
                    "(re-insert it from the stored payload if it was purged) and the dead letter RESOLVED, in one "
                    "transaction, so the relay publishes it. Run it with a release that publishes the topic. "
                    "Consumer dead letters are replayed instead (payapp dlq replay).")
    which = rq.add_mutually_exclusive_group(required=True)
    which.add_argument("--event-id", help="an eventId (or a dead-letter id)")
    which.add_argument("--all-relay", action="store_true", help="every open dead letter of the relay, oldest first")
    rq.set_defaults(handler=_dlq_requeue)


def _on_db(settings: Settings, call: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``call(conn)`` on a fresh database connection, closed afterwards (the dlq commands)."""
    from payapp.events import connect

    async def work() -> T:
        conn = await connect(settings.db_url)
        try:
            return await call(conn)
        finally:
            conn.close()

    return asyncio.run(work())


def _dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.dlq import list_dead

    print("dlq_id\tstatus\tpayment\tsequence\tevent_id\tsource\tattempts\tparked\terror")
    for d in _on_db(settings, lambda conn: list_dead(conn, include_resolved=args.all)):
        print(f"{d.dlq_id}\t{d.status}\t{d.payment_id}\t{d.sequence}\t{d.event_id}\t{d.source}\t{d.attempts}\t"
              f"{d.parked}\t{d.error}")
    return 0


def _dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.dlq import replay

    results = _on_db(settings, lambda conn: replay(conn, None if args.all else args.event_id))
    if not results:
        print("no open dead letter matched", file=sys.stderr)
        return 1
    for r in results:
        state = "ok" if r.ok else "failed"
        print(f"{r.dlq_id}\t{state}\t{r.detail}\tparked applied: {r.parked_applied}")
    return 0 if all(r.ok for r in results) else 1


def _dlq_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.dlq import requeue

    results = _on_db(settings, lambda conn: requeue(conn, None if args.all_relay else args.event_id))
    if not results:
        print("no open dead letter of the outbox relay", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.dlq_id}\t{'ok' if r.ok else 'failed'}\t{r.event_id}\t{r.topic}\t{r.detail}")
    return 0 if all(r.ok for r in results) else 1


COMMANDS = [add_relay, add_consume, add_lag, add_reconcile, add_dlq]
