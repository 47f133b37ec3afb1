"""MariaDB failover: a planned switchover and a forced promotion, on the nodes ``payctl.replication`` reaches.

Planned (``switchover``), with the old primary alive; no acknowledged commit can be lost:

    check       the candidate replicates from the primary, both threads running
    catch-up    the candidate reaches the primary's GTID while writes still flow (short final wait later)
    freeze      primary read_only=ON (the app's accounts lack READ ONLY ADMIN/SUPER: their writes now fail fast and
                the app retries them against the new primary once repointed); undone if a later step before the
                promotion fails
    drain       the candidate reaches the primary's final gtid_binlog_pos (nothing can be added to it any more)
    promote     candidate: STOP SLAVE, RESET SLAVE ALL, read_only=OFF, semi-sync master on (AFTER_SYNC)
    demote      old primary: CHANGE MASTER TO the candidate, MASTER_USE_GTID=slave_pos, MASTER_DEMOTE_TO_SLAVE=1
                (its own binlog GTIDs become its replication position), semi-sync slave, START SLAVE

Forced (``promote``), when the primary is gone: every reachable replica applies what it received; the most advanced
one by GTID is promoted; the old primary, if it answers, is fenced (read_only=ON, its server stopped accepting app
writes) so it cannot take writes when it comes back. The GTIDs the old primary had that the new one lacks (only
possible after semi-sync fell back to async) are reported as lost when the old primary's position is known.

Repointing the app (its DB URL) is the deploy engine's job: it plans from the live roles, which now name the new
primary, so a re-apply follows the failover and never undoes it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from payctl.errors import PayctlError
from payctl.replication import (
    DbNode,
    NodeIO,
    ReplicaSpec,
    ReplicationError,
    _q,
    change_master_sql,
    ensure_workdir,
    query,
    run_secret_sql,
    scalar,
    status,
    wait_caught_up,
)


class FailoverError(PayctlError):
    """A switchover or promotion could not be done (what was undone or still needs a person is in the message)."""


@dataclass
class FailoverResult:
    new_primary: str
    old_primary: str
    gtid: str = ""  # the new primary's gtid_binlog_pos when it took writes
    fenced: bool = False
    lost_gtids: str = ""  # forced only: positions the old primary had beyond the new one ("" none or unknown)
    steps: list[str] = field(default_factory=list)


def _seq(gtid: str, domain: str = "0") -> int:
    """The sequence number of ``domain`` in a GTID list such as ``0-1-42,1-3-7`` (0 when absent)."""
    for part in gtid.split(","):
        bits = part.strip().split("-")
        if len(bits) == 3 and bits[0] == domain:
            return int(bits[2])
    return 0


def _promote_sql(spec: ReplicaSpec) -> str:
    return (
        "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF; "
        "SET GLOBAL rpl_semi_sync_slave_enabled = OFF; "
        "SET GLOBAL rpl_semi_sync_master_wait_point = AFTER_SYNC; "
        f"SET GLOBAL rpl_semi_sync_master_timeout = {int(spec.semisync_timeout_ms)}; "
        "SET GLOBAL rpl_semi_sync_master_enabled = ON"
    )


def _demote_sql(spec: ReplicaSpec, new_primary: DbNode) -> str:
    attach = change_master_sql(spec, new_primary)
    return "SET GLOBAL rpl_semi_sync_master_enabled = OFF;\n" + attach.replace(
        "  MASTER_USE_GTID = slave_pos;", "  MASTER_USE_GTID = slave_pos,\n  MASTER_DEMOTE_TO_SLAVE = 1;"
    )


def _replication_user_on(node: DbNode, spec: ReplicaSpec, addresses: Sequence[str]) -> None:
    """The replication account on the new primary for every other DB node (it was made on the old primary)."""
    sql = "".join(
        f"CREATE USER IF NOT EXISTS {_q(spec.user)}@{_q(a)} IDENTIFIED BY {_q(spec.password)};\n"
        f"GRANT REPLICATION SLAVE ON *.* TO {_q(spec.user)}@{_q(a)};\n"
        for a in dict.fromkeys(addresses)
    )
    run_secret_sql(node, "replication-user", sql)


def switchover(
    primary: DbNode, candidate: DbNode, spec: ReplicaSpec, step: Callable[[str], None] | None = None
) -> FailoverResult:
    """Planned: make ``candidate`` the primary and ``primary`` its replica; no acknowledged write is lost."""
    result = FailoverResult(candidate.name, primary.name)

    def note(s: str) -> None:
        result.steps.append(s)
        if step is not None:
            step(s)

    st = status(candidate)
    if st.get("Master_Host") != primary.address or st.get("Master_Port") != str(primary.port):
        raise FailoverError(f"{candidate.name} does not replicate from {primary.name}",
                            hint="payctl status shows the live roles")  # fmt: skip
    if st.get("Slave_IO_Running") != "Yes" or st.get("Slave_SQL_Running") != "Yes":
        raise FailoverError(f"{candidate.name}'s replication is not running (IO {st.get('Slave_IO_Running')}, "
                            f"SQL {st.get('Slave_SQL_Running')}): a planned switchover needs a healthy replica",
                            hint="fix replication first, or use --force if the primary is gone")  # fmt: skip
    try:
        wait_caught_up(primary, candidate, spec.catchup_timeout_s, note)
        note(f"freeze {primary.name}: read_only=ON")
        query(primary, "SET GLOBAL read_only = ON")
        try:
            final = wait_caught_up(primary, candidate, spec.catchup_timeout_s, note)
        except PayctlError:
            note(f"rollback: {primary.name} writable again")
            query(primary, "SET GLOBAL read_only = OFF")
            raise
    except ReplicationError as exc:
        raise FailoverError(f"switchover to {candidate.name} abandoned, {primary.name} stays primary: {exc.message}",
                            hint=exc.hint) from exc  # fmt: skip
    note(f"promote {candidate.name} at GTID {final}")
    ensure_workdir(candidate)
    ensure_workdir(primary)
    query(candidate, _promote_sql(spec))
    _replication_user_on(candidate, spec, [primary.address])
    result.gtid = scalar(candidate, "SELECT @@gtid_binlog_pos")
    note(f"demote {primary.name}: replica of {candidate.name} (MASTER_DEMOTE_TO_SLAVE=1)")
    try:
        run_secret_sql(primary, "demote", _demote_sql(spec, candidate))
    except PayctlError as exc:
        raise FailoverError(f"{candidate.name} is the primary now, but demoting {primary.name} failed: {exc.message}",
                            hint=f"{primary.name} stays read-only; attach it with `payctl scale add-node` "
                            "once fixed") from exc  # fmt: skip
    result.fenced = True
    return result


def promote(candidates: Sequence[DbNode], old: DbNode | None, spec: ReplicaSpec, old_gtid: str = "",
            step: Callable[[str], None] | None = None, apply_timeout_s: float = 60.0) -> FailoverResult:  # fmt: skip
    """Forced: the primary is gone. Promote the most advanced reachable replica by GTID; fence ``old`` if it answers.

    ``old_gtid``: the old primary's last known gtid_binlog_pos (from monitoring), to report lost GTIDs without it.
    """
    if not candidates:
        raise FailoverError("no replica to promote", hint="a forced promotion needs a reachable replica")
    notes: list[str] = []

    def note(s: str) -> None:
        notes.append(s)
        if step is not None:
            step(s)

    positions: dict[str, str] = {}
    for c in candidates:
        # Apply everything received: stop fetching, wait for the SQL thread to reach the IO thread's position.
        query(c, "STOP SLAVE IO_THREAD")
        io_pos = status(c).get("Gtid_IO_Pos", "")
        if io_pos:
            got = scalar(c, f"SELECT MASTER_GTID_WAIT({_q(io_pos)}, {apply_timeout_s:.0f})")
            if got != "0":
                raise FailoverError(f"{c.name} did not apply its relay log within {apply_timeout_s:.0f}s",
                                    hint="retry; the replica's SQL thread may have stopped on an error")  # fmt: skip
        positions[c.name] = scalar(c, "SELECT @@gtid_slave_pos")
        note(f"{c.name} applied everything it received: GTID {positions[c.name] or '(empty)'}")
    best = max(candidates, key=lambda c: _seq(positions[c.name]))
    old_name = old.name if old is not None else "(unknown)"
    result = FailoverResult(best.name, old_name)
    note(f"promote {best.name} (most advanced by GTID)")
    ensure_workdir(best)
    query(best, _promote_sql(spec))
    result.gtid = scalar(best, "SELECT @@gtid_binlog_pos")
    known_old = old_gtid
    if old is not None:
        try:
            query(old, "SET GLOBAL read_only = ON")
            known_old = scalar(old, "SELECT @@gtid_binlog_pos") or known_old
            result.fenced = True
            note(f"fenced {old.name}: read_only=ON")
        except PayctlError as exc:
            note(f"{old.name} did not answer ({exc.message[:120]}): fence it when it returns (payctl failover db "
                 "re-run, or its server kept stopped)")  # fmt: skip
    if known_old and _seq(known_old) > _seq(positions[best.name]):
        result.lost_gtids = f"0-?-{_seq(positions[best.name]) + 1}..{_seq(known_old)}"
    for c in candidates:
        if c is best:
            continue
        note(f"repoint {c.name} to {best.name}")
        run_secret_sql(c, "repoint", "STOP SLAVE;\n" + change_master_sql(spec, best))
    result.steps = notes
    return result


def fence(old: DbNode, new_primary: DbNode, spec: ReplicaSpec) -> None:
    """The old primary is back after a forced promotion: keep it read-only and make it a replica of the new one.

    With semi-sync AFTER_SYNC no acknowledged commit is only on the old primary; commits it logged but never
    acknowledged may be, and MASTER_DEMOTE_TO_SLAVE would keep them: they must be looked at (lost_gtids).
    """
    ensure_workdir(old)
    query(old, "SET GLOBAL read_only = ON")
    ensure_workdir(new_primary)
    _replication_user_on(new_primary, spec, [old.address])
    run_secret_sql(old, "demote", _demote_sql(spec, new_primary))
    deadline = time.monotonic() + spec.semisync_check_s
    while time.monotonic() < deadline:
        st = status(old)
        if st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
            return
        if st.get("Last_SQL_Error") or st.get("Last_IO_Error"):
            break
        time.sleep(0.2)
    st = status(old)
    raise FailoverError(f"{old.name} is read-only but does not replicate from {new_primary.name}: "
                        f"{st.get('Last_IO_Error') or st.get('Last_SQL_Error') or 'threads not running'}",
                        hint="its extra transactions diverge from the new primary: reseed it "
                        "(payctl scale add-node after moving its datadir away)")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ Redis


@dataclass(frozen=True)
class RedisNode:
    name: str
    address: str
    port: int
    workdir: str  # 0700 directory for the 0600 password file the command reads
    io: NodeIO


def redis_command(node: RedisNode, user: str, password: str, command: str) -> str:
    """One redis-cli command on the node, authenticated from a 0600 file (never on a command line)."""
    path = f"{node.workdir}/redis-auth"
    q = shlex.quote
    ok, out, err = node.io.run(f"mkdir -p {q(node.workdir)} && chmod 700 {q(node.workdir)}")
    if not ok:
        raise FailoverError(f"{node.name}: cannot create {node.workdir}: {err.strip()}")
    node.io.put_private(path, password)
    ok, out, err = node.io.run(
        f'REDISCLI_AUTH="$(cat {q(path)})" redis-cli --no-auth-warning --user {q(user)} -h {q(node.address)} '
        f"-p {node.port} {command}; rc=$?; rm -f {q(path)}; exit $rc"
    )
    if not ok or out.startswith(("ERR", "NOPERM", "WRONGPASS")) or "Could not connect" in out + err:
        raise FailoverError(f"{node.name}: redis `{command}` failed: {(out + err).strip()[:300]}")
    return out


def redis_promote(new: RedisNode, others: Sequence[RedisNode], user: str, password: str) -> list[str]:
    """Manual Redis failover (no Sentinel quorum without a witness), as the ``sentinel`` ACL user (which may run SLAVEOF
    and ROLE, the commands Sentinel itself uses): ``new`` stops replicating and becomes the master;
    every other reachable node replicates from it. Returns what was done; an unreachable old master is listed, and
    must be made a replica when it returns (run the command again)."""
    done = []
    redis_command(new, user, password, "SLAVEOF NO ONE")
    role = redis_command(new, user, password, "ROLE").split()
    if not role or role[0] != "master":
        raise FailoverError(f"{new.name} did not become master (ROLE: {' '.join(role)[:100]})")
    done.append(f"{new.name} is the Redis master")
    for o in others:
        try:
            redis_command(o, user, password, f"SLAVEOF {shlex.quote(new.address)} {new.port}")
            done.append(f"{o.name} replicates from {new.name}")
        except FailoverError as exc:
            done.append(f"{o.name} not repointed ({exc.message[:120]}): run again when it is back")
    return done
