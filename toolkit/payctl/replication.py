"""MariaDB replication: add a GTID replica to a running primary online, with semi-sync, and undo on failure.

The steps, in the order that keeps the primary correct at every moment (it is never restarted, writes never stop):

    preflight   primary: binlog on, writable; replica: fresh (no payments schema) or already our replica
    user        replication user on the primary, REPLICATION SLAVE only, from the replica's address
    seed        a temporary seed user on the primary; on the replica ``mariadb-dump --single-transaction
                --master-data=1 --gtid`` from the primary, streamed straight into the replica's client with
                ``sql_log_bin=0`` (the replica's binlog keeps only replicated GTIDs); the dump sets gtid_slave_pos
    attach      replica: read_only=ON, CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos (the replica only),
                semi-sync slave on, START SLAVE
    catch-up    MASTER_GTID_WAIT(primary's gtid_binlog_pos) on the replica, with a deadline
    semi-sync   primary: wait point AFTER_SYNC, timeout, enabled only now (enabled earlier, every commit would wait for
                a replica that is not there yet); the replica's IO thread reconnects to negotiate it; checked
    cleanup     the seed user is dropped

Every step that changed something records its undo; a failure runs the undos in reverse order and raises.
Secrets (the replication and seed passwords) reach the nodes only inside 0600 files under a 0700 work directory and
are fed to the client on stdin or as an option file, never on a command line.

The nodes are reached through ``DbNode.io`` (run a command, write a private file): SSH in a deployment, a local shell
in the tests, which run this against real MariaDB servers.
"""

from __future__ import annotations

import re
import secrets as pysecrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from payctl.errors import PayctlError

SEED_USER = "payctl_seed"
DATABASE_RE = re.compile(r"^[A-Za-z0-9_]+$")
GTID_RE = re.compile(r"^[0-9]+-[0-9]+-[0-9]+(,[0-9]+-[0-9]+-[0-9]+)*$")


class ReplicationError(PayctlError):
    """Adding or checking a replica failed (after the undo of what was changed)."""


class NodeIO(Protocol):
    def run(self, command: str) -> tuple[bool, str, str]:
        """Run one shell command on the node: (ok, stdout, stderr)."""

    def put_private(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` on the node with mode 0600 (its directory exists, mode 0700)."""


@dataclass(frozen=True)
class DbNode:
    name: str
    address: str  # where the other DB node reaches this server (private address)
    port: int
    client: str  # shell words of an admin client on the node, e.g. "mariadb --socket=/p/run/mariadb.sock -uroot"
    workdir: str  # 0700 directory on the node for the temporary 0600 files
    io: NodeIO
    dump: str = "mariadb-dump"  # the dump program on the node (run on the replica, connecting to the primary)


@dataclass(frozen=True)
class ReplicaSpec:
    user: str
    password: str
    databases: tuple[str, ...]
    semisync_timeout_ms: int
    catchup_timeout_s: float = 120.0
    semisync_check_s: float = 20.0


@dataclass
class AddReplicaResult:
    seeded: bool  # False: the replica already replicated from this primary (nothing to seed)
    primary_gtid: str = ""  # the primary's gtid_binlog_pos the replica was checked to have reached
    semisync_clients: int = 0
    steps: list[str] = field(default_factory=list)


Step = Callable[[str], None]


def _q(s: str) -> str:
    """A SQL string literal (single quotes, backslashes and quotes escaped)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def query(node: DbNode, sql: str) -> str:
    """Run SQL without secrets (on the command line is fine) and return the tab-separated output."""
    ok, out, err = node.io.run(f"{node.client} -N -B -e {shlex.quote(sql)}")
    if not ok:
        raise ReplicationError(f"{node.name}: MariaDB refused `{sql[:80]}`: {(err or out).strip()[:400]}")
    return out


def scalar(node: DbNode, sql: str) -> str:
    """The first value of the first row ("" when there is none)."""
    out = query(node, sql).strip()
    return out.split("\n")[0].split("\t")[0].strip() if out else ""


def run_secret_sql(node: DbNode, name: str, sql: str) -> None:
    """SQL holding a secret: a 0600 file on the node, fed on stdin, deleted afterwards."""
    path = f"{node.workdir}/{name}.sql"
    node.io.put_private(path, sql)
    ok, out, err = node.io.run(f"{node.client} -N -B < {shlex.quote(path)}; rc=$?; rm -f {shlex.quote(path)}; exit $rc")
    if not ok:
        raise ReplicationError(f"{node.name}: applying {name} failed: {(err or out).strip()[:400]}")


def status(node: DbNode) -> dict[str, str]:
    """SHOW SLAVE STATUS as a dict (empty when the node replicates from nobody)."""
    ok, out, err = node.io.run(f"{node.client} -E -e 'SHOW SLAVE STATUS'")
    if not ok:
        raise ReplicationError(f"{node.name}: SHOW SLAVE STATUS failed: {(err or out).strip()[:400]}")
    kv: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep:
            kv[key] = value.strip()
        elif line.strip().endswith(":"):
            kv[line.strip()[:-1]] = ""
    return kv


def global_status(node: DbNode, like: str) -> dict[str, str]:
    out = query(node, f"SHOW GLOBAL STATUS LIKE {_q(like)}")
    return {k: v for k, _, v in (line.partition("\t") for line in out.splitlines())}


def _replicating_from(st: dict[str, str], primary: DbNode) -> bool:
    return st.get("Master_Host") == primary.address and st.get("Master_Port") == str(primary.port)


def replication_user_sql(spec: ReplicaSpec, replica_address: str) -> str:
    """The replication account on the primary: REPLICATION SLAVE only (semi-sync needs nothing more in MariaDB)."""
    u = f"{_q(spec.user)}@{_q(replica_address)}"
    return (
        f"CREATE USER IF NOT EXISTS {u} IDENTIFIED BY {_q(spec.password)};\n"
        f"ALTER USER {u} IDENTIFIED BY {_q(spec.password)};\n"
        f"GRANT REPLICATION SLAVE ON *.* TO {u};\n"
    )


def change_master_sql(spec: ReplicaSpec, primary: DbNode) -> str:
    """Run on the replica only: attach it to the primary by GTID (its gtid_slave_pos came with the snapshot)."""
    return (
        "SET GLOBAL read_only = ON;\n"
        "CHANGE MASTER TO\n"
        f"  MASTER_HOST = {_q(primary.address)},\n"
        f"  MASTER_PORT = {primary.port},\n"
        f"  MASTER_USER = {_q(spec.user)},\n"
        f"  MASTER_PASSWORD = {_q(spec.password)},\n"
        "  MASTER_CONNECT_RETRY = 10,\n"
        "  MASTER_USE_GTID = slave_pos;\n"
        "SET GLOBAL rpl_semi_sync_slave_enabled = ON;\n"
        "START SLAVE;\n"
    )


def dump_command(primary: DbNode, replica: DbNode, spec: ReplicaSpec, seed_cnf: str) -> str:
    """On the replica: a consistent online snapshot of the primary, streamed into the replica's server.

    Accounts are not in the snapshot (``--system=users`` trips over the server's utf8mb4_unicode_ci collation in
    MariaDB 10.11): the deployment's users SQL is idempotent and re-applied on the primary once the replica is
    attached, so it reaches the replica through replication.

    ``--single-transaction`` reads one InnoDB snapshot without blocking writers; ``--master-data=1 --gtid`` puts the
    snapshot's GTID position into the stream as ``SET GLOBAL gtid_slave_pos``; ``sql_log_bin=0`` keeps the load out
    of the replica's own binlog, so its GTID history stays the primary's (a later switchover needs that).
    """
    dbs = " ".join(spec.databases)
    return (
        "set -o pipefail; { echo 'SET SESSION sql_log_bin = 0;'; "
        f"{replica.dump} --defaults-extra-file={shlex.quote(seed_cnf)} --host={shlex.quote(primary.address)} "
        f"--port={primary.port} --single-transaction --master-data=1 --gtid --routines --triggers --events "
        f"--databases {dbs}; }} | {replica.client}"
    )


class _Undo:
    def __init__(self, step: Step) -> None:
        self.actions: list[tuple[str, Callable[[], object]]] = []
        self.step = step

    def push(self, what: str, action: Callable[[], object]) -> None:
        self.actions.append((what, action))

    def run(self) -> list[str]:
        failed: list[str] = []
        for what, action in reversed(self.actions):
            self.step(f"rollback: {what}")
            try:
                action()
            except PayctlError as exc:
                failed.append(f"{what}: {exc.message}")
        self.actions.clear()
        return failed


def ensure_workdir(node: DbNode) -> None:
    """The 0700 directory for the temporary 0600 files."""
    ok, out, err = node.io.run(f"mkdir -p {shlex.quote(node.workdir)} && chmod 700 {shlex.quote(node.workdir)}")
    if not ok:
        raise ReplicationError(f"{node.name}: cannot create {node.workdir}: {(err or out).strip()}")


def preflight(primary: DbNode, replica: DbNode, spec: ReplicaSpec) -> bool:
    """Checks before anything changes; returns True when the replica already replicates from this primary."""
    for db in spec.databases:
        if not DATABASE_RE.match(db):
            raise ReplicationError(f"not a database name: {db!r}")
    log_bin, read_only = query(primary, "SELECT @@log_bin, @@read_only").split()
    if log_bin != "1":
        raise ReplicationError(f"{primary.name}: the binary log is off, so it cannot be a primary",
                               hint="binlog and GTID are on from phase 1: re-apply phase 1 first")  # fmt: skip
    if read_only != "0":
        raise ReplicationError(f"{primary.name} is read-only: it is not the primary",
                               hint="payctl status shows the live roles; pass the node that takes writes")  # fmt: skip
    st = status(replica)
    if st:
        if _replicating_from(st, primary):
            return True
        raise ReplicationError(
            f"{replica.name} already replicates from {st.get('Master_Host')}:{st.get('Master_Port')}",
            hint="payctl status shows the live roles; reset it by hand only if that source is gone for good",
        )
    names = ",".join(_q(db) for db in spec.databases)
    present = query(replica, f"SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ({names})")
    if present.strip():
        raise ReplicationError(
            f"{replica.name} already holds database {present.split()[0]} but replicates from nobody",
            hint="a replica is seeded from a fresh datadir; move the data away (or payctl down --purge-data on that "
            "node) and run again",
        )
    return False


def add_replica(primary: DbNode, replica: DbNode, spec: ReplicaSpec, step: Step = lambda s: None) -> AddReplicaResult:
    """Make ``replica`` a caught-up, semi-synchronous GTID replica of ``primary`` while the primary takes writes."""
    result = AddReplicaResult(seeded=False)

    def note(s: str) -> None:
        result.steps.append(s)
        step(s)

    undo = _Undo(note)
    note(f"preflight: {primary.name} is a writable primary with binlog, {replica.name} is fresh")
    attached = preflight(primary, replica, spec)
    try:
        ensure_workdir(primary)
        ensure_workdir(replica)
        if not attached:
            note(f"replication user on {primary.name} (REPLICATION SLAVE only, from {replica.address})")
            existed = scalar(primary, f"SELECT COUNT(*) FROM mysql.user WHERE User={_q(spec.user)} "
                                      f"AND Host={_q(replica.address)}") == "1"  # fmt: skip
            run_secret_sql(primary, "replication-user", replication_user_sql(spec, replica.address))
            if not existed:
                drop = f"DROP USER IF EXISTS {_q(spec.user)}@{_q(replica.address)}"
                undo.push("drop the replication user", lambda: query(primary, drop))
            _seed(primary, replica, spec, undo, note)
            result.seeded = True
            note(f"attach {replica.name}: read_only, CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos, START SLAVE")
            run_secret_sql(replica, "change-master", change_master_sql(spec, primary))
            undo.push(f"detach {replica.name} (STOP SLAVE, RESET SLAVE ALL)",
                      lambda: query(replica, "STOP SLAVE; RESET SLAVE ALL"))  # fmt: skip
        result.primary_gtid = wait_caught_up(primary, replica, spec.catchup_timeout_s, note)
        result.semisync_clients = _semisync(primary, replica, spec, undo, note)
    except PayctlError as exc:
        failed = undo.run()
        raise ReplicationError(
            f"adding {replica.name} as a replica of {primary.name} failed: {exc.message}"
            + (f" (rollback incomplete: {'; '.join(failed)})" if failed else " (rolled back)"),
            hint=exc.hint or "fix the cause and run the command again; the primary was never restarted",
        ) from exc
    return result


def _seed(primary: DbNode, replica: DbNode, spec: ReplicaSpec, undo: _Undo, note: Step) -> None:
    password = pysecrets.token_urlsafe(24)
    seed = f"{_q(SEED_USER)}@{_q(replica.address)}"
    note(f"temporary seed user on {primary.name}")
    run_secret_sql(primary, "seed-user",
                   f"CREATE OR REPLACE USER {seed} IDENTIFIED BY {_q(password)};\n"
                   f"GRANT SELECT, RELOAD, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT, BINLOG MONITOR, REPLICATION CLIENT "
                   f"ON *.* TO {seed};\n")  # fmt: skip
    cnf = f"{replica.workdir}/seed.cnf"

    def drop_seed() -> None:
        replica.io.run(f"rm -f {shlex.quote(cnf)}")
        query(primary, f"DROP USER IF EXISTS {seed}")

    undo.push("drop the seed user", drop_seed)
    replica.io.put_private(cnf, f"[client]\nuser={SEED_USER}\npassword={password}\n")
    note(f"seed {replica.name}: mariadb-dump --single-transaction --master-data=1 --gtid from {primary.name}, "
         "streamed into the replica")  # fmt: skip
    undo.push(f"drop the seeded databases on {replica.name}", lambda: query(
        replica, "SET SESSION sql_log_bin = 0; " + " ".join(f"DROP DATABASE IF EXISTS `{d}`;" for d in spec.databases)
        + " SET GLOBAL gtid_slave_pos = ''"))  # fmt: skip
    ok, out, err = replica.io.run(f"bash -c {shlex.quote(dump_command(primary, replica, spec, cnf))}")
    if not ok:
        raise ReplicationError(f"{replica.name}: seeding from {primary.name} failed: {(err or out).strip()[:600]}")
    pos = scalar(replica, "SELECT @@gtid_slave_pos")
    if not GTID_RE.match(pos):
        raise ReplicationError(f"{replica.name}: the snapshot set no GTID position (gtid_slave_pos={pos!r})")
    note(f"snapshot loaded at GTID {pos}; seed user dropped")
    drop_seed()


def wait_caught_up(primary: DbNode, replica: DbNode, timeout_s: float, note: Step = lambda s: None) -> str:
    """Wait until the replica has applied everything the primary had logged when this was called; returns that GTID.

    ``MASTER_GTID_WAIT`` blocks on the replica until its gtid_slave_pos contains the position (0) or times out (-1).
    """
    pos = scalar(primary, "SELECT @@gtid_binlog_pos")
    note(f"catch-up: wait for {replica.name} to reach {primary.name}'s GTID {pos or '(empty)'}")
    if not pos:
        return pos
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            st = status(replica)
            raise ReplicationError(
                f"{replica.name} did not reach GTID {pos} within {timeout_s:.0f}s (at {st.get('Gtid_Slave_Pos', '?')}, "
                f"IO {st.get('Slave_IO_Running', '?')}, SQL {st.get('Slave_SQL_Running', '?')}, "
                f"{st.get('Last_IO_Error') or st.get('Last_SQL_Error') or 'no error'})",
                hint="check the network between the nodes and the replica's error log",
            )
        got = scalar(replica, f"SELECT MASTER_GTID_WAIT({_q(pos)}, {min(5.0, left):.1f})")
        if got == "0":
            return pos
        st = status(replica)
        if st.get("Last_SQL_Error") or (st.get("Slave_SQL_Running") == "No"):
            why = st.get("Last_SQL_Error") or "SQL thread off"
            raise ReplicationError(f"{replica.name}: replication stopped: {why}")


def _semisync(primary: DbNode, replica: DbNode, spec: ReplicaSpec, undo: _Undo, note: Step) -> int:
    was = scalar(primary, "SELECT @@rpl_semi_sync_master_enabled")
    note(f"semi-sync on {primary.name}: AFTER_SYNC, timeout {spec.semisync_timeout_ms} ms (then async, reported)")
    query(primary, "SET GLOBAL rpl_semi_sync_master_wait_point = AFTER_SYNC; "
                   f"SET GLOBAL rpl_semi_sync_master_timeout = {int(spec.semisync_timeout_ms)}; "
                   "SET GLOBAL rpl_semi_sync_master_enabled = ON")  # fmt: skip
    if was != "1":
        undo.push(f"semi-sync off on {primary.name}",
                  lambda: query(primary, "SET GLOBAL rpl_semi_sync_master_enabled = OFF"))  # fmt: skip
    # The replica declares semi-sync when its IO thread connects: reconnect it now that the primary wants it.
    query(replica, "SET GLOBAL rpl_semi_sync_slave_enabled = ON; STOP SLAVE IO_THREAD; START SLAVE IO_THREAD")
    deadline = time.monotonic() + spec.semisync_check_s
    while True:
        st = global_status(primary, "Rpl_semi_sync_master_%")
        clients = int(st.get("Rpl_semi_sync_master_clients", "0") or 0)
        if clients >= 1 and st.get("Rpl_semi_sync_master_status") == "ON":
            return clients
        if time.monotonic() > deadline:
            raise ReplicationError(
                f"{primary.name}: semi-sync did not become active within {spec.semisync_check_s:.0f}s "
                f"(clients {clients}, status {st.get('Rpl_semi_sync_master_status')})"
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class ReplicaState:
    """What ``payctl status`` shows for one DB node."""

    node: str
    read_only: bool
    gtid_binlog_pos: str
    source: str = ""  # host:port it replicates from ("" for a primary)
    io_running: str = ""
    sql_running: str = ""
    lag_s: int | None = None
    semisync_master: str = ""  # ON/OFF on a primary with semi-sync configured
    semisync_clients: int = 0


def replica_state(node: DbNode) -> ReplicaState:
    ro, pos = [*query(node, "SELECT @@read_only, @@gtid_binlog_pos").rstrip("\n").split("\t"), ""][:2]
    st = status(node)
    ss = global_status(node, "Rpl_semi_sync_master_%")
    lag = st.get("Seconds_Behind_Master", "")
    return ReplicaState(
        node=node.name,
        read_only=ro == "1",
        gtid_binlog_pos=pos,
        source=f"{st['Master_Host']}:{st.get('Master_Port', '')}" if st.get("Master_Host") else "",
        io_running=st.get("Slave_IO_Running", ""),
        sql_running=st.get("Slave_SQL_Running", ""),
        lag_s=int(lag) if lag.isdigit() else None,
        semisync_master=ss.get("Rpl_semi_sync_master_status", ""),
        semisync_clients=int(ss.get("Rpl_semi_sync_master_clients", "0") or 0),
    )


class ShellIO:
    """Read-only ``NodeIO`` over a plain shell function (``payctl status``): writing files is refused."""

    def __init__(self, shell: Callable[[str], tuple[bool, str, str]]) -> None:
        self.shell = shell

    def run(self, command: str) -> tuple[bool, str, str]:
        return self.shell(command)

    def put_private(self, path: str, text: str) -> None:
        raise ReplicationError("read-only access: no file may be written here")


def role_summary(shell: Callable[[str], tuple[bool, str, str]], name: str, prefix: str, address: str,
                 port: int = 3306, client: str | None = None) -> dict[str, str]:  # fmt: skip
    """For ``payctl status``: the node's MariaDB role with replication lag (seconds and GTID) and semi-sync state.

    Empty when no MariaDB answers on the node's socket.
    """
    client = client or f"mariadb --socket={shlex.quote(prefix + '/run/mariadb.sock')} -uroot"
    node = DbNode(name, address, port, client, f"{prefix}/payctl/tmp", ShellIO(shell))
    try:
        s = replica_state(node)
    except PayctlError:
        return {}
    if s.source:
        lag = f"{s.lag_s} s" if s.lag_s is not None else "unknown"
        return {"mariadb": f"replica of {s.source}, lag {lag}, GTID {s.gtid_binlog_pos or '-'}, "
                           f"IO {s.io_running}, SQL {s.sql_running}"}  # fmt: skip
    out = {"mariadb": f"{'read-only, replicates from nobody' if s.read_only else 'primary'}, "
                      f"GTID {s.gtid_binlog_pos or '-'}"}  # fmt: skip
    if s.semisync_master:
        out["semi-sync"] = f"{s.semisync_master} ({s.semisync_clients} replica(s) acknowledging)"
    return out
