"""``payctl restore --force``: put a point-in-time restore in service as the deployment's MariaDB primary.

The data is restored exactly as ``payctl restore`` does it, into the scratch instance on the primary's node (port
3307) while the deployment keeps serving; only then is anything stopped:

    check      (nothing stopped yet) the scratch restore's ledger and reconciliation are balanced; the scratch
               server is shut down cleanly (its datadir is what goes in service)
    stop       the writers: payctl-app, payctl-relay, payctl-consumer on every app node and the daily backup on
               the DB node; then the old server's GTID binlog state and last binlog file are read; MariaDB stops
    swap       the old datadir is renamed ``<datadir>.replaced-<UTC>`` (kept, never deleted), the restored one is
               moved in with the old one's owner and mode
    start      MariaDB; no replication configuration; ``RESET MASTER TO <old last + 1>`` and ``gtid_binlog_state``
               = the old server's, so binlog names and GTID sequence numbers continue after the old ones: no GTID
               and no binlog file name of the old timeline is ever reused for different data
    verify     payments, last payment id and ledger sums equal the scratch report; ``payapp reconcile`` (settle
               lag 0) over the business days the replay covered is balanced -- before any traffic comes back
    writers    started again; health of every node (programs RUNNING, /health directly and through nginx)

Any failure from ``stop`` on puts the old datadir back (the restored one is kept as ``<datadir>.restore-failed-<UTC>``
for inspection), starts MariaDB and the writers again and checks health: nothing is left half-applied, and the error
says whether the put-back worked.

Deployments with MariaDB replicas are refused: a replica holds the old data and would diverge from the restored
primary, and re-seeding replicas is not automated here (docs/operations.md says what to do by hand). The daily
reconciliation is ``payapp reconcile`` run by an operator or a scheduler of theirs: payctl deploys no reconcile
program, so there is none to stop.

The steps on nodes go through ``SwapNodes`` (commands, program control, health): SSH and supervisorctl/systemctl in a
deployment, fakes in the unit tests. The core never prints.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Protocol

from payctl import audit, backup, components, dbbackup, deploy, hosts, lock, restore, rolling
from payctl.backup import GTID_RE, BackupError, Manifest, Step, _quiet, stop_datetime
from payctl.dbbackup import RESTORE_PORT
from payctl.errors import PayctlError
from payctl.gate import deployed_phase
from payctl.plan import PORTS, Plan
from payctl.render import mariadb_datadir, payapp_bin
from payctl.secrets import load_or_create

DB_PROGRAM = "payctl-mariadb"


class SwapRefused(PayctlError):
    """``--force`` cannot be planned here (replicas, the wrong node, not native): nothing was touched."""

    exit_code = 2


class SwapFailed(BackupError):
    """A step after the writers stopped failed; the message says whether the old data is back in service."""


@dataclass(frozen=True)
class SwapPlan:
    deployment: str
    node: str  # the MariaDB primary
    prefix: str
    backup_id: str
    until: datetime | None
    datadir: str
    kept: str  # where the old datadir is kept (renamed, never deleted)
    failed: str  # where the restored datadir goes if the swap is undone
    scratch: str  # the scratch restore's directory (its data/ is moved in)
    writers: tuple[tuple[str, tuple[str, ...]], ...]  # (node, programs): stopped first, started last
    lab: bool
    reconcile_node: str  # an app node whose payapp reconciles the data put in service ("" none)
    reconcile_prefix: str
    stamp: str

    @property
    def admin(self) -> str:
        return f"mariadb --socket={shlex.quote(self.prefix + '/run/mariadb.sock')} -uroot"


def make_swap_plan(plan: Plan, manifest: Manifest, until: datetime | None, node: str | None, now: datetime,
                   lab: bool) -> SwapPlan:  # fmt: skip
    """What ``--force`` will do on this deployment, or ``SwapRefused`` saying why not and what to do instead."""
    topo = plan.topology
    primary = topo.mariadb_primary
    if topo.mariadb_replicas:
        raise SwapRefused(
            f"deployment '{plan.deployment}' has MariaDB replicas ({', '.join(topo.mariadb_replicas)}): they hold the "
            f"old data and would diverge from a restored primary",
            hint="restore without --force into the scratch instance and check it; putting it in service on a "
            "replicated deployment is a manual runbook (docs/operations.md, 'Restore with replicas')",
        )  # fmt: skip
    if node is not None and node != primary:
        raise SwapRefused(f"--force replaces the primary's data: --node must be {primary} (the MariaDB primary), "
                          f"not {node}", hint=f"drop --node, or pass --node {primary}")  # fmt: skip
    n = plan.node(primary)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    datadir = mariadb_datadir(n.prefix)
    writers: list[tuple[str, tuple[str, ...]]] = []
    for p in plan.active_nodes:
        progs = components.app_programs_of(p)
        if p.name == primary:
            # The daily backup: FLUSH BINARY LOGS and a mariabackup must not run against a datadir being swapped.
            progs += ("payctl-backup",) if lab else ("payctl-backup.timer", "payctl-backup.service")
        if progs:
            writers.append((p.name, progs))
    reconciler = next((p for p in plan.active_nodes if p.app is not None), None)
    return SwapPlan(
        deployment=plan.deployment, node=primary, prefix=n.prefix, backup_id=manifest.id, until=until,
        datadir=datadir, kept=f"{datadir}.replaced-{stamp}", failed=f"{datadir}.restore-failed-{stamp}",
        scratch=f"{n.prefix}/restore/{manifest.id}", writers=tuple(writers), lab=lab,
        reconcile_node=reconciler.name if reconciler else "", reconcile_prefix=reconciler.prefix if reconciler else "",
        stamp=stamp,
    )  # fmt: skip


def describe(p: SwapPlan) -> list[str]:
    """The plan as the operator reads it before confirming."""
    until = f"{stop_datetime(p.until)} UTC" if p.until else "the end of the binlogs"
    stops = "; ".join(f"{node}: {', '.join(progs)}" for node, progs in p.writers)
    return [
        f"restore --force on deployment '{p.deployment}': backup {p.backup_id} up to {until} REPLACES the data of "
        f"the MariaDB primary {p.node}",
        f"  1. restore into a scratch instance on {p.node}:{RESTORE_PORT} while the deployment serves; stop here "
        "unless its ledger and reconciliation are balanced",
        f"  2. stop the writers ({stops}): payments fail from here until step 6",
        f"  3. stop {DB_PROGRAM} on {p.node}",
        f"  4. keep the old datadir {p.datadir} as {p.kept} (never deleted); move the restored one in",
        f"  5. start {DB_PROGRAM}: binlog files and GTID sequence continue after the old server's; check payments, "
        "ledger and payapp reconcile",
        "  6. start the writers; health of every node",
        f"  payments committed after {until} are NOT in the restored data; replicas: none",
        "  a failure after step 2 puts the old datadir back and starts everything again",
    ]


class SwapNodes(Protocol):
    def run(self, node: str, command: str) -> tuple[bool, str, str]:
        """One shell command on ``node``: (ok, stdout, stderr)."""

    def programs(self, node: str, verb: str, programs: tuple[str, ...]) -> None:
        """``stop``/``start`` ``programs`` on ``node`` (waits for them); raises PayctlError when that fails."""

    def healthy(self, timeout_s: float) -> tuple[bool, str]:
        """(every node healthy within ``timeout_s``, what is not)."""


@dataclass
class SwapResult:
    plan: SwapPlan
    applied: bool = False
    rolled_back: bool | None = None  # None: nothing to undo; True: the old data serves again; False: it does not
    old_gtid_state: str = ""
    first_binlog: str = ""
    payments: int = 0
    last_payment_id: int = 0
    total_debit: int = 0
    total_credit: int = 0
    reconcile: list[str] = field(default_factory=list)
    reconciled: bool | None = None
    out_of_service_s: float = 0.0  # writers stopped -> healthy again
    steps: list[str] = field(default_factory=list)


def _must(nodes: SwapNodes, node: str, command: str, what: str) -> str:
    ok, out, err = nodes.run(node, command)
    if not ok:
        raise SwapFailed(f"{node}: {what} failed: {(err or out).strip()[-500:] or 'no output'}")
    return out


def stop_scratch_command(scratch: str) -> str:
    """SIGTERM the scratch server (clean InnoDB shutdown) and wait up to 120 s; its datadir must then be there."""
    q = shlex.quote
    pid = q(f"{scratch}/run/mariadb.pid")
    return (f"pid=$(cat {pid} 2>/dev/null || true); if [ -n \"$pid\" ] && kill \"$pid\" 2>/dev/null; then "
            f"for i in $(seq 1 1200); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; "
            f"kill -0 \"$pid\" 2>/dev/null && {{ echo 'still running after 120 s' >&2; exit 1; }}; fi; "
            f"test -f {q(scratch + '/data/ibdata1')} || {{ echo 'no restored datadir in {scratch}' >&2; exit 1; }}")


def swap_command(p: SwapPlan) -> str:
    """Old datadir kept aside, restored one moved in with the old one's owner and mode (one node, same filesystem)."""
    q = shlex.quote
    return (f"set -e; test ! -e {q(p.kept)}; mv {q(p.datadir)} {q(p.kept)}; "
            f"mv {q(p.scratch + '/data')} {q(p.datadir)}; chown -R --reference={q(p.kept)} {q(p.datadir)}; "
            f"chmod --reference={q(p.kept)} {q(p.datadir)}")


def put_back_command(p: SwapPlan) -> str:
    """The old datadir in place again (whatever step the swap reached); the restored one kept aside."""
    q = shlex.quote
    return (f"set -e; [ -e {q(p.kept)} ] || exit 0; "
            f"if [ -e {q(p.datadir)} ]; then mv {q(p.datadir)} {q(p.failed)}; fi; mv {q(p.kept)} {q(p.datadir)}")


def wait_sql_command(admin: str, seconds: int = 120) -> str:
    return (f"for i in $(seq 1 {seconds * 10}); do {admin} -N -B -e 'SELECT 1' >/dev/null 2>&1 && exit 0; "
            f"sleep 0.1; done; echo 'MariaDB does not answer after {seconds} s' >&2; exit 1")


def next_binlog(last_file: str) -> int:
    """The number of the first binlog file of the restored server: after the old server's last one."""
    suffix = last_file.strip().rsplit(".", 1)[-1]
    if not suffix.isdigit():
        raise SwapFailed(f"the old server's binlog file {last_file!r} has no number",
                         hint="binlog is on from phase 1: is this a payctl MariaDB?")  # fmt: skip
    return int(suffix) + 1


def prime_command(p: SwapPlan, first_binlog: int, state: str) -> str:
    """On the restored datadir, before it serves: a private mariadbd (the node's my.cnf, no networking, no replication)
    drops any replication configuration and starts the binlog at file ``first_binlog``; after its clean shutdown the
    old server's GTID state goes into ``mysql-bin.state``, which MariaDB reads on its next clean start. (``SET GLOBAL
    gtid_binlog_state`` would restart the binlog numbering at 000001.)"""
    if state and not GTID_RE.match(state):
        raise SwapFailed(f"the old server's GTID binlog state {state!r} is not a GTID list")
    q = shlex.quote
    cnf = f"{p.prefix}/mariadb/my.cnf"
    log = f"{p.prefix}/logs/restore-prime-{p.stamp}.log"
    sql = (f"STOP ALL SLAVES; RESET SLAVE ALL; RESET MASTER TO {first_binlog}; SET GLOBAL gtid_slave_pos = ''")
    gtids = " ".join(q(g) for g in state.split(",") if g)
    write = f"printf '%s\\n' {gtids}" if gtids else ":"
    return (f"mariadbd --defaults-file={q(cnf)} --user={'root' if p.lab else 'mysql'} --skip-networking "
            f"--skip-slave-start < /dev/null > {q(log)} 2>&1 & pid=$!; "
            f"up=; for i in $(seq 1 1200); do {p.admin} -N -B -e 'SELECT 1' >/dev/null 2>&1 && {{ up=1; break; }}; "
            f"kill -0 $pid 2>/dev/null || break; sleep 0.1; done; "
            f"if [ -z \"$up\" ]; then kill $pid 2>/dev/null; wait $pid; "
            f"tail -n 15 {q(log)} {q(p.prefix + '/logs/mariadb.err')} >&2; exit 1; fi; "
            f"{p.admin} -e {q(sql)}; rc=$?; kill $pid; wait $pid; [ $rc -eq 0 ] || exit $rc; "
            f"{write} > {q(p.datadir + '/mysql-bin.state')} && "
            f"chown --reference={q(p.datadir)} {q(p.datadir + '/mysql-bin.state')}")


def same_gtids(a: str, b: str) -> bool:
    return {g.strip() for g in a.split(",") if g.strip()} == {g.strip() for g in b.split(",") if g.strip()}


def swap(p: SwapPlan, expect: restore.RestoreResult, days: tuple[date, date], nodes: SwapNodes, step: Step = _quiet,
         health_timeout_s: float = 90.0, clock: Callable[[], float] = time.monotonic) -> SwapResult:  # fmt: skip
    """Put the scratch restore ``expect`` in service as ``p.node``'s datadir; undo everything on any failure."""
    r = SwapResult(p)

    def note(s: str) -> None:
        r.steps.append(s)
        step(s)

    if not expect.ledger_balanced or expect.reconciled is False:
        raise SwapRefused(f"the restored data is not balanced (ledger debit {expect.total_debit} credit "
                          f"{expect.total_credit}, reconciliation {expect.reconciled}): nothing was stopped",
                          hint=f"inspect the scratch instance on {p.node}:{expect.port}, or restore to another "
                          "point")  # fmt: skip
    note(f"shut the scratch server down cleanly ({p.scratch})")
    _must(nodes, p.node, stop_scratch_command(p.scratch), "stopping the scratch server")
    stopped_at = clock()
    try:
        for node, progs in p.writers:
            note(f"stop {', '.join(progs)} on {node}")
            nodes.programs(node, "stop", progs)
        out = _must(nodes, p.node, f"{p.admin} -N -B -e 'SELECT @@gtid_binlog_state' && {p.admin} -N -B -e "
                                   "'SHOW MASTER STATUS'", "reading the old server's binlog position")  # fmt: skip
        lines = out.splitlines()
        r.old_gtid_state = lines[0].strip() if lines else ""
        first = next_binlog(lines[1].split("\t")[0] if len(lines) > 1 else "")
        note(f"stop {DB_PROGRAM} on {p.node} (GTID binlog state {r.old_gtid_state or '-'})")
        nodes.programs(p.node, "stop", (DB_PROGRAM,))
        note(f"keep {p.datadir} as {p.kept}; move the restored datadir in")
        _must(nodes, p.node, swap_command(p), "swapping the datadir")
        note(f"binlog from mysql-bin.{first:06d}, GTID state {r.old_gtid_state or '-'} (a private mariadbd, no "
             "networking)")  # fmt: skip
        _must(nodes, p.node, prime_command(p, first, r.old_gtid_state), "preparing the binlog and GTID state")
        note(f"start {DB_PROGRAM} on the restored data")
        nodes.programs(p.node, "start", (DB_PROGRAM,))
        _must(nodes, p.node, wait_sql_command(p.admin), "waiting for MariaDB")
        out = _must(nodes, p.node, f"{p.admin} -N -B -e 'SELECT @@gtid_binlog_state' && {p.admin} -N -B -e "
                                   "'SHOW MASTER STATUS'", "reading the new binlog position")  # fmt: skip
        lines = out.splitlines()
        now_state, now_file = (lines[0].strip() if lines else ""), (lines[1].split("\t")[0] if len(lines) > 1 else "")
        if not same_gtids(now_state, r.old_gtid_state) or next_binlog(now_file) <= first:
            raise SwapFailed(f"the restored server's binlog does not continue the old one: GTID state {now_state!r} "
                             f"(want {r.old_gtid_state!r}), binlog {now_file!r} (want mysql-bin.{first:06d} or later)")
        r.first_binlog = now_file
        _verify(p, expect, days, nodes, r, note)
        for node, progs in p.writers:
            note(f"start {', '.join(progs)} on {node}")
            nodes.programs(node, "start", progs)
        note("health of every node")
        ok, detail = nodes.healthy(health_timeout_s)
        if not ok:
            raise SwapFailed(f"not healthy within {health_timeout_s:.0f} s on the restored data: {detail}")
        r.out_of_service_s = round(clock() - stopped_at, 2)
        note(f"remove the rest of the scratch restore ({p.scratch}: its data is in service now)")
        nodes.run(p.node, f"rm -rf {shlex.quote(p.scratch)}")
    except (PayctlError, KeyboardInterrupt) as exc:
        what = exc.message if isinstance(exc, PayctlError) else "interrupted (SIGINT)"
        r.rolled_back, detail = _put_back(p, nodes, note, health_timeout_s)
        r.out_of_service_s = round(clock() - stopped_at, 2)
        state = (f"the old datadir is back in service at {p.datadir} and the deployment is healthy (the restored "
                 f"data is kept in {p.failed})" if r.rolled_back else
                 f"putting the old datadir back did not fully work: {detail}")  # fmt: skip
        raise SwapFailed(f"restore --force failed: {what}; {state}",
                         hint="payctl status -i INV; the old datadir is never deleted" if not r.rolled_back else
                         "nothing changed; fix the cause and run again") from None  # fmt: skip
    r.applied = True
    return r


def _verify(p: SwapPlan, expect: restore.RestoreResult, days: tuple[date, date], nodes: SwapNodes, r: SwapResult,
            note: Step) -> None:  # fmt: skip
    out = _must(nodes, p.node, f"{p.admin} -N -B -e {shlex.quote(restore.FIGURES_SQL)}", "reading the data in service")
    r.payments, r.last_payment_id, r.total_debit, r.total_credit = restore.parse_figures(out)
    got = (r.payments, r.last_payment_id, r.total_debit, r.total_credit)
    want = (expect.payments, expect.last_payment_id, expect.total_debit, expect.total_credit)
    if got != want:
        raise SwapFailed(f"the data in service is not what was restored: payments, last id, debit, credit {got} "
                         f"!= {want}")  # fmt: skip
    note(f"in service: {r.payments} payments, last id {r.last_payment_id}, debit {r.total_debit} = credit "
         f"{r.total_credit}")  # fmt: skip
    if not p.reconcile_node:
        return
    note(f"payapp reconcile on {p.reconcile_node}, {days[0]} to {days[1]} (settle lag 0: nothing is in flight)")
    q = shlex.quote
    ok, out, err = nodes.run(p.reconcile_node, f"PAYAPP_RECONCILE_SETTLE_LAG_S=0 "
                             f"{q(payapp_bin(p.reconcile_prefix) + '/payapp')} reconcile --env-file "
                             f"{q(p.reconcile_prefix + '/app.env')} --from {days[0]} --to {days[1]}")  # fmt: skip
    r.reconcile = [ln for ln in out.splitlines() if restore.REPORT_LINE.match(ln)]
    r.reconciled = ok and bool(r.reconcile) and all("balanced=true" in ln for ln in r.reconcile)
    if not r.reconciled:
        raise SwapFailed(f"payapp reconcile on the data in service is not balanced: "
                         f"{'; '.join(r.reconcile) or (err or out).strip()[-300:]}")  # fmt: skip


def _put_back(p: SwapPlan, nodes: SwapNodes, note: Step, health_timeout_s: float) -> tuple[bool, str]:
    """Old datadir in place, MariaDB and the writers started, health; (healthy, what went wrong)."""
    problems: list[str] = []
    note(f"put the old datadir back: stop the writers and {DB_PROGRAM}")
    for node, progs in p.writers:
        try:
            nodes.programs(node, "stop", progs)
        except PayctlError as exc:
            problems.append(exc.message)
    try:
        nodes.programs(p.node, "stop", (DB_PROGRAM,))
    except PayctlError as exc:
        problems.append(exc.message)
    ok, out, err = nodes.run(p.node, put_back_command(p))
    if not ok:
        return False, f"moving {p.kept} back to {p.datadir} failed: {(err or out).strip()[-300:]}"
    note(f"{p.datadir} is the old datadir again; start {DB_PROGRAM} and the writers")
    try:
        nodes.programs(p.node, "start", (DB_PROGRAM,))
        _must(nodes, p.node, wait_sql_command(p.admin), "waiting for MariaDB")
        for node, progs in p.writers:
            nodes.programs(node, "start", progs)
    except PayctlError as exc:
        return False, exc.message
    healthy, detail = nodes.healthy(health_timeout_s)
    return healthy, detail if not healthy else "; ".join(problems)


# --------------------------------------------------------------------------------------------------- on a deployment


@dataclass(frozen=True)
class ForceRequest:
    restore: dbbackup.RestoreRequest
    inventory_path: Path
    command: str  # for the audit line
    health_timeout_s: float = 90.0


@dataclass(frozen=True)
class Prepared:
    swap: SwapPlan
    manifest: Manifest
    plan: Plan
    phase: int | None
    reconcile_tz: str


def prepare(req: ForceRequest, now: datetime | None = None) -> Prepared:
    """The swap plan for this deployment from its live roles; refusals before anything is touched."""
    r = req.restore
    inv = r.inventory
    if inv.runtime != "native":
        raise SwapRefused(f"payctl restore drives native deployments; {inv.deployment} runs on {inv.runtime}",
                          hint="docs/operations.md, 'Putting restored data in service'")  # fmt: skip
    if r.port == PORTS["mariadb"]:
        raise SwapRefused(f"--port {r.port} is the live MariaDB's: the scratch instance needs another port",
                          hint=f"drop --port (default {RESTORE_PORT})")  # fmt: skip
    directory = dbbackup.backups_dir(r.home, inv.deployment, r.source)
    manifest = backup.load(directory, r.backup_id)
    restore.check_until(manifest, r.until)
    plan, read_only = dbbackup._plan(inv, r.home)
    primary = plan.topology.mariadb_primary
    if read_only.get(primary) is not False:
        raise SwapRefused(f"{primary} does not answer as a writable MariaDB primary (read_only "
                          f"{read_only.get(primary)}): --force swaps a running primary's data",
                          hint="payctl status -i INV shows the live roles")  # fmt: skip
    sp = make_swap_plan(plan, manifest, r.until, r.node, now or datetime.now(UTC), hosts.is_lab(inv))
    app = next((n.app for n in plan.active_nodes if n.name == sp.reconcile_node), None)
    tz = dict(app.env).get("PAYAPP_RECONCILE_TZ", "Asia/Seoul") if app is not None else "Asia/Seoul"
    return Prepared(sp, manifest, plan, deployed_phase(inv.deployment, r.home), tz)


class _Quiet:
    """deploy.check_health wants deploy hooks; its progress goes to ours."""

    def __init__(self, hooks: dbbackup.Progress) -> None:
        self.hooks = hooks

    def step(self, node: str | None, step: str) -> None:
        self.hooks.step(node, step)

    def confirm(self, preview: deploy.Preview) -> bool:  # pragma: no cover - never asked
        return True


class SshNodes:
    """``SwapNodes`` over the deployment's SSH connections: supervisorctl in the lab, systemctl on VMs."""

    def __init__(self, conn: hosts.Connected, plan: Plan, lab: bool, hooks: dbbackup.Progress) -> None:
        self.conn, self.plan, self.lab, self.hooks = conn, plan, lab, hooks

    def run(self, node: str, command: str) -> tuple[bool, str, str]:
        return deploy.shell_of(self.conn.host(node))(command)

    def programs(self, node: str, verb: str, programs: tuple[str, ...]) -> None:
        rolling.NodeShell(self.conn, node, self.plan.node(node).prefix, self.lab).programs(verb, programs)

    def healthy(self, timeout_s: float) -> tuple[bool, str]:
        checks = deploy.check_health(self.conn, self.plan, _Quiet(self.hooks), timeout=timeout_s)
        bad = [c for c in checks if not c.ok]
        return not bad, "; ".join(f"{c.node} {c.check}: {self.conn.redact(c.detail)[:200]}" for c in bad)


def run_force(req: ForceRequest, prep: Prepared, hooks: dbbackup.Progress) -> tuple[restore.RestoreResult, SwapResult]:
    """Under the deploy lock: the scratch restore, then the swap; one audit line whatever happens."""
    started = time.monotonic()
    r = req.restore
    inv = r.inventory
    sp = prep.swap
    redact = load_or_create(r.home, inv.deployment, allow_create=False).redact
    first = inv.nodes[0].name
    held = lock.new_info(inv.deployment, req.command)
    with hosts.connect(inv, r.home, nodes=[first], redact=redact) as conn:
        lock.acquire(deploy.shell_of(conn.host(first)), inv.node_prefix(first), held, node=first)
    error: PayctlError | None = None
    result: SwapResult | None = None
    try:
        restored = dbbackup.run_restore(replace(r, node=sp.node), hooks)
        end = r.until or (datetime.fromisoformat(restored.last_event_at) if restored.last_event_at
                          else prep.manifest.finished)  # fmt: skip
        days = restore.reconcile_days(prep.manifest.finished, end, prep.reconcile_tz)
        with hosts.connect(inv, r.home, redact=redact) as conn:
            result = swap(sp, restored, days, SshNodes(conn, prep.plan, sp.lab, hooks),
                          lambda s: hooks.step(sp.node, s), req.health_timeout_s)  # fmt: skip
        return restored, result
    except PayctlError as exc:
        error = exc
        raise
    except KeyboardInterrupt:
        error = BackupError("interrupted (SIGINT)")
        raise
    finally:
        _audit_and_release(req, prep, result, error, held, started, redact)


def _audit_and_release(req: ForceRequest, prep: Prepared, result: SwapResult | None, error: PayctlError | None,
                       held: lock.LockInfo, started: float, redact: hosts.Redactor) -> None:  # fmt: skip
    inv = req.restore.inventory
    sp = prep.swap
    record = audit.AuditRecord(
        deployment=inv.deployment, command=req.command, phase=prep.phase, inventory=str(req.inventory_path),
        inventory_sha256=audit.inventory_hash(req.inventory_path) if req.inventory_path.is_file() else "",
        nodes=tuple(n for n, _ in sp.writers) or (sp.node,), result="failed" if error else "ok",
        changed_files=(f"{sp.node}:{sp.datadir} <- backup {sp.backup_id} (old kept as {sp.kept})",) if result else (),
        restarted=(*(f"{n}/{p}" for n, progs in sp.writers for p in progs), f"{sp.node}/{DB_PROGRAM}"),
        error=error.message if error else "", duration_s=round(time.monotonic() - started, 2),
    )  # fmt: skip
    audit.append_local(req.restore.home, record, redact)
    line = record.line(redact)
    try:
        with hosts.connect(inv, req.restore.home, redact=redact) as conn:
            for node, host in conn.hosts.items():
                deploy.shell_of(host)(audit.append_command(inv.node_prefix(node), line))
            first = inv.nodes[0].name
            lock.release(deploy.shell_of(conn.host(first)), inv.node_prefix(first), held)
    except PayctlError:
        if error is None:
            raise  # else the first error is the one to show; `payctl lock status` shows a lock left behind
