"""The audit after a fault drill: what the client saw acknowledged against what the database holds.

Two inputs, one verdict:

* ``LoadLog`` — parsed from the k6 log of ``loadtest/drill.js``: every request (time, name, status) and every
  operation acknowledged with 200 (authorizations with their merchant, amount and idempotency key; captures; refunds).
* ``DbFacts`` — what the database says about every payment of the drill's merchants (selected by the run's merchant
  prefix, so earlier traffic never counts), gathered by ``FACTS_SCRIPT``, which runs on the node with the node's own
  payapp virtualenv and settings (so no password leaves the node's env file).

``judge(log, facts)`` gives an ``Audit``: ``lost`` (acknowledged but missing, captures never settled, events never
published or applied) and ``duplicates`` (a payment with no idempotency key of its own, a settlement applied twice,
one payment id acknowledged for two keys), each as named counts. ``Timeline`` reads the request log around the fault:
requests sent, failures during the fault, and when the API recovered. Nothing here runs a command or prints.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from payctl.errors import PayctlError

# Requests must succeed for this long, without a single failure, for the API to count as recovered.
STABLE_S = 3.0


@dataclass(frozen=True)
class Request:
    t: float  # epoch seconds, when the response (or the failure) came back
    name: str
    status: int  # 0: no response

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Authorized:
    payment_id: int
    merchant: str
    amount: int
    key: str


@dataclass
class LoadLog:
    """Everything the drill's k6 run logged."""

    requests: list[Request] = field(default_factory=list)
    authorized: list[Authorized] = field(default_factory=list)
    captured: list[int] = field(default_factory=list)
    refunded: list[int] = field(default_factory=list)
    unreadable: int = 0  # lines with one of our prefixes that did not parse

    @property
    def sent(self) -> int:
        return len(self.requests)

    @property
    def acknowledged(self) -> int:
        return sum(1 for r in self.requests if r.ok)


def parse_log(lines: list[str]) -> LoadLog:
    """Read ``Q``/``A``/``C``/``R`` lines of the drill script's log; k6's own lines are ignored."""
    out = LoadLog()
    for line in lines:
        parts = line.split()
        if not parts or parts[0] not in ("Q", "A", "C", "R"):
            continue
        try:
            if parts[0] == "Q" and len(parts) == 4:
                out.requests.append(Request(int(parts[1]) / 1000.0, parts[2], int(parts[3])))
            elif parts[0] == "A" and len(parts) == 5:
                out.authorized.append(Authorized(int(parts[1]), parts[2], int(parts[3]), parts[4]))
            elif parts[0] == "C" and len(parts) == 3:
                out.captured.append(int(parts[1]))
            elif parts[0] == "R" and len(parts) == 3:
                out.refunded.append(int(parts[1]))
            else:
                out.unreadable += 1
        except ValueError:
            out.unreadable += 1
    return out


# ------------------------------------------------------------------------------------------------------ timeline


@dataclass(frozen=True)
class Timeline:
    """The API's side of the drill, from the request log and the fault's start and end (epoch seconds)."""

    sent: int
    acknowledged: int
    failed_before: int  # failures before the fault: the deployment was not healthy to begin with
    failed_during: int  # failures from the fault's start on
    requests_during: int  # requests from the fault's start to the recovery (or the end)
    recovered_after_s: float | None  # from the fault's start to the first STABLE_S of clean traffic after its end
    # HTTP status -> requests, from the fault's start to the recovery (0: no response within the client's timeout)
    statuses_during: tuple[tuple[int, int], ...] = ()

    @property
    def statuses_text(self) -> str:
        """``503: 41, 200: 12, 0: 2`` (most frequent first), or ``-`` when no request fell in the fault."""
        return ", ".join(f"{code}: {n}" for code, n in self.statuses_during) or "-"

    @property
    def error_rate_during(self) -> float:
        return self.failed_during / self.requests_during if self.requests_during else 0.0


def timeline(requests: list[Request], fault_start: float, fault_end: float, stable_s: float = STABLE_S) -> Timeline:
    """Requests around the fault, and when the API recovered: the start of the first run of ``stable_s`` seconds
    (with traffic) without a failed request, at or after the fault's end. None when the load ended first."""
    reqs = sorted(requests, key=lambda r: r.t)
    before = [r for r in reqs if r.t < fault_start]
    after = [r for r in reqs if r.t >= fault_start]
    recovered_at: float | None = None
    candidate: float | None = None
    for r in after:
        if not r.ok:
            candidate = None
            continue
        if r.t < fault_end:
            continue
        if candidate is None:
            candidate = r.t
        if r.t - candidate >= stable_s:
            recovered_at = candidate
            break
    end = recovered_at if recovered_at is not None else float("inf")
    failed_during = sum(1 for r in after if not r.ok)
    statuses = Counter(r.status for r in after if r.t < end)
    return Timeline(
        sent=len(reqs),
        acknowledged=sum(1 for r in reqs if r.ok),
        failed_before=sum(1 for r in before if not r.ok),
        failed_during=failed_during,
        requests_during=sum(1 for r in after if r.t < end),
        recovered_after_s=None if recovered_at is None else max(0.0, recovered_at - fault_start),
        statuses_during=tuple(sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


# ------------------------------------------------------------------------------------------------------ database

# Runs on the node as `<venv>/bin/python -c FACTS_SCRIPT ENV_FILE MERCHANT_PREFIX`; prints one JSON document.
# Only counts and the rows of problems leave the node, plus one row per payment of this drill.
FACTS_SCRIPT = r"""
import asyncio, json, sys
import asyncmy
from payapp.db import connect_kwargs
from payapp.events import CONSUMED
from payapp.settings import load_settings

env_file, prefix = sys.argv[1], sys.argv[2]
like = prefix + "%"
MINE = "SELECT payment_id FROM payment WHERE merchant_id LIKE %s"

async def rows(cur, sql, *args):
    await cur.execute(sql, args)
    return [list(r) for r in await cur.fetchall()]

async def main():
    conn = await asyncmy.connect(**connect_kwargs(load_settings(env_file).db))
    try:
        async with conn.cursor() as cur:
            out = {}
            out["payments"] = await rows(cur, "SELECT payment_id, merchant_id, amount, status, captured_amount,"
                " refunded_amount FROM payment WHERE merchant_id LIKE %s", like)
            out["unbalanced"] = await rows(cur, "SELECT p.payment_id, COALESCE(SUM(IF(l.direction = 'DEBIT',"
                " l.amount, 0)), 0), COALESCE(SUM(IF(l.direction = 'CREDIT', l.amount, 0)), 0) FROM payment p"
                " LEFT JOIN ledger_entry l ON l.payment_id = p.payment_id WHERE p.merchant_id LIKE %s"
                " GROUP BY p.payment_id HAVING SUM(IF(l.direction = 'DEBIT', l.amount, 0))"
                " <> SUM(IF(l.direction = 'CREDIT', l.amount, 0)) OR COUNT(l.entry_id) = 0", like)
            out["keyless"] = (await rows(cur, "SELECT COUNT(*) FROM payment p WHERE p.merchant_id LIKE %s"
                " AND NOT EXISTS (SELECT 1 FROM idempotency_key k WHERE k.merchant_id = p.merchant_id"
                " AND k.scope = 'authorize' AND k.payment_id = p.payment_id)", like))[0][0]
            out["settlements"] = await rows(cur, "SELECT o.kind, COUNT(s.settlement_id) AS n, COUNT(*) FROM"
                " (SELECT o.operation_id, o.kind FROM payment_operation o WHERE o.kind IN ('CAPTURE', 'REFUND')"
                f" AND o.payment_id IN ({MINE})) o LEFT JOIN settlement s ON s.operation_id = o.operation_id"
                " AND s.kind = IF(o.kind = 'CAPTURE', 'CAPTURE', 'ADJUSTMENT')"
                " GROUP BY o.operation_id, o.kind", like)
            topics = ",".join(["%s"] * len(CONSUMED))
            out["events"] = (await rows(cur, "SELECT COUNT(*), COALESCE(SUM(o.published_at IS NULL), 0),"
                f" COALESCE(SUM(o.topic IN ({topics}) AND pe.event_id IS NULL), 0) FROM outbox_event o"
                " LEFT JOIN processed_event pe ON pe.event_id = o.event_id WHERE o.merchant_id LIKE %s",
                *CONSUMED, like))[0]
            out["dead_letters"] = (await rows(cur, "SELECT COUNT(*) FROM dlq_event WHERE status = 'OPEN'"
                f" AND payment_id IN ({MINE})", like))[0][0]
            out["parked"] = (await rows(cur, f"SELECT COUNT(*) FROM parked_event WHERE payment_id IN ({MINE})",
                like))[0][0]
    finally:
        conn.close()
    print(json.dumps(out, default=int))

asyncio.run(main())
"""


def facts_argv(python: str, env_file: str, merchant_prefix: str) -> list[str]:
    """The command that prints the facts: the node's payapp Python, its env file, the run's merchant prefix."""
    return [python, "-c", FACTS_SCRIPT, env_file, merchant_prefix]


@dataclass(frozen=True)
class Payment:
    payment_id: int
    merchant: str
    amount: int
    status: str
    captured: int
    refunded: int


@dataclass(frozen=True)
class DbFacts:
    """What the database holds for the drill's merchants (``FACTS_SCRIPT``'s output)."""

    payments: dict[int, Payment]
    unbalanced: tuple[int, ...] = ()  # payments whose ledger does not balance (or has no entries)
    keyless: int = 0  # payments no authorize idempotency key points at
    # per CAPTURE/REFUND operation: how many settlement rows it has (must be exactly 1)
    settlement_counts: tuple[tuple[str, int], ...] = ()
    events: int = 0
    unpublished: int = 0
    unapplied: int = 0  # events of the consumer's topics with no processed_event row
    dead_letters: int = 0
    parked: int = 0

    @classmethod
    def from_json(cls, text: str) -> DbFacts:
        try:
            doc: dict[str, Any] = json.loads(text)
            payments = {
                int(r[0]): Payment(int(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4]), int(r[5]))
                for r in doc["payments"]
            }
            events = [int(x) for x in doc["events"]]
            return cls(
                payments=payments,
                unbalanced=tuple(int(r[0]) for r in doc["unbalanced"]),
                keyless=int(doc["keyless"]),
                settlement_counts=tuple((str(r[0]), int(r[1])) for r in doc["settlements"]),
                events=events[0],
                unpublished=events[1],
                unapplied=events[2],
                dead_letters=int(doc["dead_letters"]),
                parked=int(doc["parked"]),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PayctlError(
                f"the drill audit could not read the database facts: {exc!r}: {text[:200]}",
                hint="run the drill again; if it persists, the schema may differ from payapp's",
            ) from None

    @property
    def settled(self) -> bool:
        """The pipeline has caught up: every event published and applied, every capture and refund settled."""
        return self.unpublished == 0 and self.unapplied == 0 and all(n >= 1 for _, n in self.settlement_counts)


@dataclass(frozen=True)
class Audit:
    lost: dict[str, int]
    duplicates: dict[str, int]
    problems: tuple[str, ...]  # what broke, in words (empty when the audit passed)
    payments: int  # of the drill, in the database
    acknowledged_payments: int

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())

    @property
    def duplicates_total(self) -> int:
        return sum(self.duplicates.values())

    @property
    def passed(self) -> bool:
        return not self.problems


def judge(log: LoadLog, facts: DbFacts) -> Audit:
    """Every acknowledged operation must be in the database, settled once, its events applied once."""
    db = facts.payments
    acked = {a.payment_id for a in log.authorized}
    keys_per_id = Counter(a.payment_id for a in {(a.payment_id, a.key): a for a in log.authorized}.values())
    missing = sum(1 for a in log.authorized if a.payment_id not in db)
    wrong = sum(
        1 for a in log.authorized if a.payment_id in db and (db[a.payment_id].merchant, db[a.payment_id].amount)
        != (a.merchant, a.amount)
    )  # fmt: skip
    lost = {
        "acknowledged payments missing": missing,
        "acknowledged payments with another merchant or amount": wrong,
        "acknowledged captures not captured": sum(1 for p in set(log.captured) if p not in db or db[p].captured <= 0),
        "acknowledged refunds not refunded": sum(1 for p in set(log.refunded) if p not in db or db[p].refunded <= 0),
        "captures not settled": sum(1 for kind, n in facts.settlement_counts if kind == "CAPTURE" and n == 0),
        "refunds not adjusted": sum(1 for kind, n in facts.settlement_counts if kind == "REFUND" and n == 0),
        "events not published": facts.unpublished,
        "events not applied": facts.unapplied,
        "events dead-lettered or parked": facts.dead_letters + facts.parked,
    }
    duplicates = {
        "payments without their own idempotency key": facts.keyless,
        "payment ids acknowledged for two keys": sum(1 for n in keys_per_id.values() if n > 1),
        "captures settled more than once": sum(1 for k, n in facts.settlement_counts if k == "CAPTURE" and n > 1),
        "refunds adjusted more than once": sum(1 for k, n in facts.settlement_counts if k == "REFUND" and n > 1),
    }
    problems = [f"lost: {name}: {n}" for name, n in lost.items() if n]
    problems += [f"duplicated: {name}: {n}" for name, n in duplicates.items() if n]
    if facts.unbalanced:
        ids = ", ".join(map(str, facts.unbalanced[:5]))
        problems.append(f"{len(facts.unbalanced)} payments with an unbalanced ledger (e.g. {ids})")
    if not log.authorized:
        problems.append("no payment was acknowledged: nothing to audit")
    if log.unreadable:
        problems.append(f"{log.unreadable} unreadable lines in the k6 log")
    return Audit(lost, duplicates, tuple(problems), len(db), len(acked))
