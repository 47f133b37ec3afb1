"""Point-in-time restore of a ``payctl.backup`` into a FRESH, scratch MariaDB instance on a node; then reconcile.

The steps, in an order where nothing live is touched:

    verify      every file of the backup against its manifest (sha256, size) before anything else
    check       ``--until`` is not before the backup's end (its data already holds later commits); the target port
                is free and no scratch instance of this backup runs on the node
    binlogs     the backup's own binlogs, plus (when the source node still answers) the source's binlogs written
                since, so any point up to now can be reached
    ship        the files to ``<prefix>/restore/<ID>/`` on the target node (checked again there)
    prepare     ``mariabackup --prepare`` on the unpacked copy
    start       a scratch ``mariadbd`` on that datadir: its own port, socket and pid file, no binlog, no replication
    replay      ``mariadb-binlog --start-position=<backup GTID> [--stop-datetime=<until, UTC>]`` over the binlogs
                (``TZ=UTC`` so the stop time means UTC whatever the node's zone), fed to the scratch server
    report      payments, last payment id, ledger Σdebit / Σcredit, then ``payapp reconcile`` on the restored data
                for the business days the replay covered (it writes its report row into the scratch copy only)

The scratch instance keeps running for inspection; ``discard`` stops it (by its pid file) and deletes its directory.
Putting the restored data in service as the primary is ``payctl.restoreswap`` (``payctl restore --force``).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from payctl.backup import BASE, BackupError, Manifest, NodeFiles, Step, _quiet, stop_datetime, verify

#: The longest unix socket path mariadbd accepts (sun_path is 108 bytes with its NUL).
SOCKET_PATH_MAX = 107
GTID_LINE = re.compile(r"^#(\d{6}\s+\d{1,2}:\d{2}:\d{2}) server id \d+.*\bGTID (\d+-\d+-\d+)")
REPORT_LINE = re.compile(r"^report (\d+) (\S+) balanced=(true|false) debit=(-?\d+) credit=(-?\d+) payments=(\d+)")


@dataclass(frozen=True)
class Target:
    """Where the scratch instance runs."""

    name: str
    io: NodeFiles
    workdir: str  # <prefix>/restore/<ID> on the node
    address: str  # the address the scratch server binds (the app account's host must match: the node's private one)
    port: int
    run_as: str  # mariadbd --user (root in the lab, mysql on VMs)
    client: str  # admin client without --socket, e.g. "mariadb -uroot" (unix_socket root of the restored grants)
    payapp: str  # the payapp program on the node ("" none: no reconciliation)
    db_url: str  # PAYAPP_DB_URL of the scratch server for payapp (a secret: only ever in a 0600 file)
    reconcile_tz: str = "Asia/Seoul"

    @property
    def socket(self) -> str:
        """``<workdir>/run/mariadb.sock``; a unix socket path has at most 107 bytes (mariadbd aborts beyond), so a
        deep workdir gets a short stable name in /tmp instead."""
        path = f"{self.workdir}/run/mariadb.sock"
        if len(path.encode()) <= SOCKET_PATH_MAX:
            return path
        return f"/tmp/payctl-restore-{hashlib.sha256(self.workdir.encode()).hexdigest()[:16]}.sock"

    @property
    def pid_file(self) -> str:
        return f"{self.workdir}/run/mariadb.pid"


@dataclass
class RestoreResult:
    backup_id: str
    node: str
    port: int
    socket: str
    until: datetime | None
    start_gtid: str
    last_gtid: str = ""
    last_event_at: str = ""  # UTC time of the last replayed transaction
    transactions: int = 0
    payments: int = 0
    last_payment_id: int = 0
    total_debit: int = 0
    total_credit: int = 0
    reconcile: list[str] = field(default_factory=list)  # payapp's report lines
    reconciled: bool | None = None  # None: not run
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)

    @property
    def ledger_balanced(self) -> bool:
        return self.total_debit == self.total_credit


def check_until(manifest: Manifest, until: datetime | None) -> None:
    if until is not None and until < manifest.finished:
        raise BackupError(
            f"--until {until.isoformat()} is before the end of backup {manifest.id} ({manifest.finished_at}): its data "
            "already holds what was committed until then",
            hint="pick an older backup (payctl backup -i INV --list) or a later --until",
        )


def replay_command(binlogs: Sequence[str], start_gtid: str, until: datetime | None, out_sql: str) -> str:
    """``mariadb-binlog`` from the backup's GTID (exclusive) to ``until`` (UTC) into ``out_sql``."""
    q = shlex.quote
    stop = f" --stop-datetime={q(stop_datetime(until))}" if until is not None else ""
    files = " ".join(q(b) for b in binlogs)
    return f"TZ=UTC mariadb-binlog --start-position={q(start_gtid)}{stop} {files} > {q(out_sql)}"


def parse_replay(sql_text: str) -> tuple[int, str, str]:
    """(transactions, last GTID, last event time in UTC ISO) of a ``mariadb-binlog`` output made with ``TZ=UTC``."""
    n, last, at = 0, "", ""
    for line in sql_text.splitlines():
        m = GTID_LINE.match(line)
        if m:
            n += 1
            last = m.group(2)
            at = datetime.strptime(m.group(1).replace("  ", " "), "%y%m%d %H:%M:%S").replace(tzinfo=UTC).isoformat()
    return n, last, at


def reconcile_days(start: datetime, end: datetime, tz: str) -> tuple[date, date]:
    """The business days (in ``tz``) from ``start`` to ``end``: what ``payapp reconcile --from --to`` checks."""
    zone = ZoneInfo(tz)
    return start.astimezone(zone).date(), max(start, end).astimezone(zone).date()


def binlog_order(names: Sequence[str]) -> list[str]:
    """Binlog file names in write order (by their numeric suffix, then name)."""
    return sorted(dict.fromkeys(names), key=lambda n: (int(n.rsplit(".", 1)[-1]) if n[-6:].isdigit() else 0, n))


def check_contiguous(names: Sequence[str]) -> None:
    """Binlog files numbered without a gap: a missing file would silently skip the transactions it held."""
    nums = [int(n.rsplit(".", 1)[-1]) for n in names]
    for (a, na), (b, nb) in zip(zip(nums, names, strict=True), zip(nums[1:], names[1:], strict=True), strict=False):
        if b != a + 1:
            raise BackupError(f"binlog files between {na} and {nb} are missing: the replay would skip transactions",
                              hint="the source purged them (binlog_expire_logs_seconds) or they were not copied; "
                              "restore to a point before the gap, or from a newer backup")  # fmt: skip


def _run(t: Target, command: str, what: str, hint: str = "") -> str:
    ok, out, err = t.io.run(command)
    if not ok:
        raise BackupError(f"{t.name}: {what} failed: {(err or out).strip()[-600:]}",
                          hint=hint or f"the scratch instance's files are in {t.workdir} on {t.name}")  # fmt: skip
    return out


def check_target(t: Target) -> None:
    """Refuse a target whose port is taken or that already runs a scratch instance of this backup."""
    q = shlex.quote
    _, out, _ = t.io.run(
        f"pid=$(cat {q(t.pid_file)} 2>/dev/null) && kill -0 \"$pid\" 2>/dev/null && echo running; "
        f"(exec 3<>/dev/tcp/{t.address}/{t.port}) 2>/dev/null && echo port-taken; "
        f"[ -e {q(t.workdir)} ] && echo exists; exit 0"
    )
    said = set(out.split())
    if "running" in said:
        raise BackupError(f"{t.name}: a restored instance of this backup already runs there ({t.workdir})",
                          hint="look at it, or remove it with `payctl restore -i INV --backup ID --discard` "
                          "and run again")  # fmt: skip
    if "port-taken" in said:
        raise BackupError(f"{t.name}: port {t.port} on {t.address} is taken: the target is busy",
                          hint="pass another --port (the live MariaDB uses 3306; restores default to 3307)")
    if "exists" in said:
        raise BackupError(f"{t.name}: {t.workdir} exists from an earlier restore of this backup",
                          hint="remove it with `payctl restore -i INV --backup ID --discard` and run again")


def restore(manifest: Manifest, directory: Path, extra_binlogs: Sequence[Path], target: Target,
            until: datetime | None, step: Step = _quiet) -> RestoreResult:  # fmt: skip
    """Verify, ship, prepare, start, replay to ``until`` and report. ``extra_binlogs``: local binlog files of the
    source written after the backup (fetched by the caller), replayed after the backup's own."""
    result = RestoreResult(manifest.id, target.name, target.port, target.socket, until, manifest.gtid)
    t0 = time.monotonic()

    def note(s: str) -> None:
        result.steps.append(s)
        step(s)

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        result.timings[name] = round(now - since, 2)
        return now

    note(f"verify {len(manifest.files)} files of backup {manifest.id} (sha256)")
    verify(directory, manifest)
    check_until(manifest, until)
    check_target(target)
    t = lap("verify", t0)
    q = shlex.quote
    w = target.workdir
    _run(target, f"umask 077 && mkdir -p {q(w)}/binlogs {q(w)}/run {q(w)}/logs && chmod 700 {q(w)}", "mkdir")
    local = directory / manifest.id
    shipped: list[tuple[Path, str]] = [(local / f.name, f"{w}/{f.name}") for f in manifest.files]
    shipped += [(p, f"{w}/binlogs/{p.name}") for p in extra_binlogs if p.name not in manifest.binlogs]
    note(f"ship {len(shipped)} files to {target.name}:{w}")
    for src, dest in shipped:
        target.io.push(src, dest)
    sums = {f"{w}/{f.name}": f.sha256 for f in manifest.files}
    out = _run(target, f"sha256sum {' '.join(q(p) for p in sums)}", "checking the shipped files")
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        if sums.get(name.strip()) not in (None, digest):
            raise BackupError(f"{target.name}: {name.strip()} arrived damaged", hint="run the restore again")
    t = lap("ship", t)
    note("unpack and mariabackup --prepare")
    _run(target, f"tar -C {q(w)} -xzf {q(w + '/' + BASE)} && mv {q(w)}/base {q(w)}/data && "
                 f"mariadb-backup --prepare --target-dir={q(w)}/data > {q(w)}/logs/prepare.log 2>&1 || "
                 f"{{ tail -n 15 {q(w)}/logs/prepare.log >&2; exit 1; }}", "mariabackup --prepare")  # fmt: skip
    if target.run_as != "root":
        _run(target, f"chown -R {q(target.run_as)}: {q(w)}/data {q(w)}/run {q(w)}/logs", "chown")
    t = lap("prepare", t)
    note(f"start a scratch mariadbd on {target.address}:{target.port} (no binlog, no replication)")
    _start(target)
    t = lap("start", t)
    names = binlog_order([*manifest.binlogs, *(p.name for p in extra_binlogs)])
    check_contiguous(names)
    sql = f"{w}/replay.sql"
    until_text = stop_datetime(until) + " UTC" if until else "the end of the binlogs"
    note(f"replay {len(names)} binlog files from GTID {manifest.gtid} to {until_text}")
    _run(target, replay_command([f"{w}/binlogs/{n}" for n in names], manifest.gtid, until, sql), "mariadb-binlog")
    listing = _run(target, f"grep -E '^#[0-9]{{6}} .*GTID [0-9]+-[0-9]+-[0-9]+' {q(sql)} || true", "reading replay")
    result.transactions, result.last_gtid, result.last_event_at = parse_replay(listing)
    _run(target, f"{target.client} --socket={q(target.socket)} < {q(sql)}", "applying the binlogs",
         hint="the scratch server's log is in the restore directory (logs/error.log)")  # fmt: skip
    t = lap("replay", t)
    _report(target, result)
    if target.payapp:
        note("payapp reconcile on the restored data")
        start = manifest.finished
        end = until or (datetime.fromisoformat(result.last_event_at) if result.last_event_at else start)
        _reconcile(target, result, *reconcile_days(start, end, target.reconcile_tz))
    lap("report", t)
    result.timings["total"] = round(time.monotonic() - t0, 2)
    return result


def _start(t: Target) -> None:
    q = shlex.quote
    w = t.workdir
    args = (f"--no-defaults --datadir={q(w)}/data --port={t.port} --bind-address={q(t.address)} "
            f"--socket={q(t.socket)} --pid-file={q(t.pid_file)} --log-error={q(w)}/logs/error.log "
            f"--user={q(t.run_as)} --skip-log-bin --skip-slave-start --server-id=4242 --innodb-buffer-pool-size=256M "
            "--character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci --skip-name-resolve")  # fmt: skip
    # The background job's own redirections: the SSH/subprocess pipes must not stay open in it.
    _run(t, f"cd {q(w)} || exit 1; setsid mariadbd {args} < /dev/null > {q(w)}/logs/mariadbd.out 2>&1 & "
            f"for i in $(seq 1 600); do [ -S {q(t.socket)} ] && exit 0; sleep 0.1; done; "
            f"tail -n 15 {q(w)}/logs/error.log >&2; exit 1", "starting the scratch mariadbd")  # fmt: skip


#: payments, last payment id, Σdebit, Σcredit (``-N -B``: two lines) -- what a restore reports, and what
#: ``restore --force`` checks again on the server it put in service.
FIGURES_SQL = ("SELECT COUNT(*), COALESCE(MAX(payment_id), 0) FROM payments.payment; "
               "SELECT COALESCE(SUM(IF(direction = 'DEBIT', amount, 0)), 0), "
               "COALESCE(SUM(IF(direction = 'CREDIT', amount, 0)), 0) FROM payments.ledger_entry")  # fmt: skip


def parse_figures(out: str) -> tuple[int, int, int, int]:
    """(payments, last payment id, Σdebit, Σcredit) from ``FIGURES_SQL``'s output."""
    rows = [line.split("\t") for line in out.strip().splitlines()]
    return int(rows[0][0]), int(rows[0][1]), int(rows[1][0]), int(rows[1][1])


def _report(t: Target, r: RestoreResult) -> None:
    out = _run(t, f"{t.client} --socket={shlex.quote(t.socket)} -N -B -e {shlex.quote(FIGURES_SQL)}",
               "reading the restored data")  # fmt: skip
    r.payments, r.last_payment_id, r.total_debit, r.total_credit = parse_figures(out)


def _reconcile(t: Target, r: RestoreResult, first: date, last: date) -> None:
    q = shlex.quote
    env = f"{t.workdir}/reconcile.env"
    # Settle lag 0: the restored data ends at the restore point, nothing is in flight after it; the app's default lag
    # (60 s of real time) would leave a restore of the last minute unjudged.
    t.io.put_private(env, f"PAYAPP_DB_URL={t.db_url}\nPAYAPP_RECONCILE_TZ={t.reconcile_tz}\n"
                          "PAYAPP_RECONCILE_SETTLE_LAG_S=0\n")
    ok, out, err = t.io.run(f"{q(t.payapp)} reconcile --env-file {q(env)} --from {first.isoformat()} "
                            f"--to {last.isoformat()}")  # fmt: skip
    lines = [ln for ln in out.splitlines() if REPORT_LINE.match(ln)]
    if not lines:
        raise BackupError(f"{t.name}: payapp reconcile on the restored data failed: {(err or out).strip()[-400:]}",
                          hint=f"the scratch instance still runs on port {t.port}; look at it, then --discard")
    r.reconcile = lines
    r.reconciled = ok and all("balanced=true" in ln for ln in lines)


def discard(t: Target) -> bool:
    """Stop the scratch instance (by its pid file) and delete its directory; False when there was nothing."""
    q = shlex.quote
    ok, out, err = t.io.run(
        f"[ -e {q(t.workdir)} ] || {{ echo none; exit 0; }}; "
        f"pid=$(cat {q(t.pid_file)} 2>/dev/null || true); "
        f"if [ -n \"$pid\" ] && kill \"$pid\" 2>/dev/null; then "
        f"for i in $(seq 1 600); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; fi; "
        f"rm -rf {q(t.workdir)}"
    )
    if not ok:
        raise BackupError(f"{t.name}: removing {t.workdir} failed: {(err or out).strip()}")
    return "none" not in out.split()

