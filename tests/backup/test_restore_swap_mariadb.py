"""`restore --force`'s swap against real MariaDB servers on this machine (no lab): a "node" prefix with the node's
my.cnf (binlog, GTID strict mode, like the rendered one), a live server with 8 payments and binlog files up to
mysql-bin.000005, and a restored datadir holding the first 5 (no binlog, as a scratch restore leaves it).

The seam faked is ``SwapNodes.programs`` (supervisorctl in the lab): here it starts ``mariadbd --defaults-file`` of
the prefix, as the supervisor program does, and stops it with SIGTERM. Commands run in a real bash; the swap, the
private mariadbd that sets the binlog/GTID state, and the undo are the real ones.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from payctl import restore, restoreswap
from payctl.restoreswap import SwapFailed, SwapPlan

pytestmark = pytest.mark.slow
DAYS = (date(2026, 11, 26), date(2026, 11, 26))
SCHEMA = ("CREATE DATABASE payments; CREATE TABLE payments.payment (payment_id BIGINT AUTO_INCREMENT PRIMARY KEY, "
          "amount BIGINT NOT NULL); CREATE TABLE payments.ledger_entry (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
          "payment_id BIGINT, direction VARCHAR(6), amount BIGINT)")  # fmt: skip


def pay(n: int) -> str:
    return "".join("INSERT INTO payments.payment (amount) VALUES (1000); SET @p = LAST_INSERT_ID(); "
                   "INSERT INTO payments.ledger_entry (payment_id, direction, amount) VALUES (@p, 'DEBIT', 1000), "
                   "(@p, 'CREDIT', 1000);" for _ in range(n))  # fmt: skip


class Node:
    """The prefix's MariaDB as a program (start/stop), commands in bash, SQL over the socket."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.calls: list[str] = []
        self.unhealthy = 0  # how many health checks fail first

    def sql(self, statements: str) -> str:
        p = subprocess.run(["mariadb", f"--socket={self.prefix}/run/mariadb.sock", "-uroot", "-N", "-B", "-e",
                            statements], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    def run(self, node: str, command: str) -> tuple[bool, str, str]:
        p = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        return p.returncode == 0, p.stdout, p.stderr

    def programs(self, node: str, verb: str, programs: tuple[str, ...]) -> None:
        self.calls.append(f"{verb} {','.join(programs)}")
        if "payctl-mariadb" not in programs:
            return
        if verb == "stop" and self.proc is not None:
            self.proc.terminate()
            self.proc.wait(120)
            self.proc = None
        elif verb == "start" and self.proc is None:
            self.proc = subprocess.Popen(["mariadbd", f"--defaults-file={self.prefix}/mariadb/my.cnf", "--user=root"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)  # fmt: skip
            deadline = time.monotonic() + 60
            while not self.run(node, f"mariadb --socket={self.prefix}/run/mariadb.sock -uroot -e 'SELECT 1'")[0]:
                assert self.proc.poll() is None and time.monotonic() < deadline, "mariadbd did not start"
                time.sleep(0.1)

    def healthy(self, timeout_s: float) -> tuple[bool, str]:
        self.calls.append("health")
        if self.unhealthy:
            self.unhealthy -= 1
            return False, "node1 app: /health 503"
        return True, ""


@pytest.fixture
def node() -> Iterator[Node]:
    prefix = Path(tempfile.mkdtemp(prefix="payctl-swap-", dir="/tmp"))  # short: socket paths are limited
    for d in ("mariadb", "data", "run", "logs"):
        (prefix / d).mkdir()
    (prefix / "mariadb" / "my.cnf").write_text(
        f"[mariadbd]\ndatadir = {prefix}/data/mariadb\nsocket = {prefix}/run/mariadb.sock\n"
        f"pid-file = {prefix}/run/mariadb.pid\nlog-error = {prefix}/logs/mariadb.err\nskip-networking\n"
        "server_id = 1\nlog_bin = mysql-bin\nbinlog_format = ROW\ngtid_strict_mode = ON\ngtid_domain_id = 0\n"
        "log_slave_updates = ON\nread_only = OFF\ninnodb_buffer_pool_size = 64M\n"
    )
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={prefix}/data/mariadb", "--user=root",
                    "--skip-test-db"], check=True, capture_output=True, timeout=120)  # fmt: skip
    n = Node(prefix)
    n.programs("node1", "start", ("payctl-mariadb",))
    n.sql(SCHEMA + ";" + pay(5) + "FLUSH BINARY LOGS; FLUSH BINARY LOGS;")
    # the restored datadir: the data up to here, without binlogs (a scratch restore runs with --skip-log-bin)
    n.programs("node1", "stop", ("payctl-mariadb",))
    scratch = prefix / "restore" / "20261125T170312Z"
    scratch.mkdir(parents=True)
    shutil.copytree(prefix / "data" / "mariadb", scratch / "data", symlinks=True)
    for f in (scratch / "data").glob("mysql-bin.*"):
        f.unlink()
    n.programs("node1", "start", ("payctl-mariadb",))
    n.sql(pay(3) + "FLUSH BINARY LOGS;")  # after the restore point
    n.calls.clear()
    try:
        yield n
    finally:
        n.programs("node1", "stop", ("payctl-mariadb",))
        shutil.rmtree(prefix, ignore_errors=True)


def plan_for(prefix: Path) -> SwapPlan:
    datadir = f"{prefix}/data/mariadb"
    return SwapPlan(deployment="lab", node="node1", prefix=str(prefix), backup_id="20261125T170312Z", until=None,
                    datadir=datadir, kept=f"{datadir}.replaced-X", failed=f"{datadir}.restore-failed-X",
                    scratch=f"{prefix}/restore/20261125T170312Z", writers=(("node1", ("payctl-app",)),), lab=True,
                    reconcile_node="", reconcile_prefix="", stamp="X")  # fmt: skip


def expect() -> restore.RestoreResult:
    return restore.RestoreResult("20261125T170312Z", "node1", 3307, "", None, "0-1-1", payments=5, last_payment_id=5,
                                 total_debit=5000, total_credit=5000)  # fmt: skip


def gtid_seq(state: str) -> int:
    return max(int(g.rsplit("-", 1)[1]) for g in state.split(","))


def test_the_restored_data_serves_and_its_binlog_continues_the_old_timeline(node: Node) -> None:
    old_state = node.sql("SELECT @@gtid_binlog_state")
    old_file = node.sql("SHOW MASTER STATUS").split()[0]
    assert node.sql("SELECT COUNT(*) FROM payments.payment") == "8" and old_file == "mysql-bin.000005"
    r = restoreswap.swap(plan_for(node.prefix), expect(), DAYS, node)
    assert r.applied and (r.payments, r.last_payment_id, r.total_debit) == (5, 5, 5000)
    assert node.calls == ["stop payctl-app", "stop payctl-mariadb", "start payctl-mariadb", "start payctl-app",
                          "health"]  # fmt: skip
    assert node.sql("SELECT MAX(payment_id), COUNT(*) FROM payments.payment").split() == ["5", "5"]
    assert r.old_gtid_state == old_state and node.sql("SELECT @@gtid_binlog_state") == old_state
    # binlog names after the old server's: a restore from an older backup cannot mistake them for the old ones
    assert r.first_binlog > old_file and node.sql("SHOW BINARY LOGS").split()[0] >= "mysql-bin.000006"
    node.sql(pay(1))
    assert gtid_seq(node.sql("SELECT @@gtid_binlog_pos")) > gtid_seq(old_state)  # no GTID of the old timeline reused
    assert node.sql("SELECT MAX(payment_id) FROM payments.payment") == "6"
    kept = Path(plan_for(node.prefix).kept)
    assert (kept / "mysql-bin.000005").is_file() and (kept / "ibdata1").is_file()  # the old datadir, untouched
    assert not Path(plan_for(node.prefix).scratch).exists()


def test_an_unhealthy_result_puts_the_old_data_back_in_service(node: Node) -> None:
    old_state = node.sql("SELECT @@gtid_binlog_state")
    node.unhealthy = 1
    with pytest.raises(SwapFailed) as exc:
        restoreswap.swap(plan_for(node.prefix), expect(), DAYS, node)
    assert "the old datadir is back in service" in exc.value.message
    assert node.sql("SELECT COUNT(*) FROM payments.payment") == "8"  # the old data, all of it
    assert node.sql("SELECT @@gtid_binlog_state") == old_state
    failed = Path(plan_for(node.prefix).failed)
    assert (failed / "ibdata1").is_file() and not Path(plan_for(node.prefix).kept).exists()
    assert node.calls[-5:] == ["stop payctl-app", "stop payctl-mariadb", "start payctl-mariadb", "start payctl-app",
                               "health"]  # fmt: skip

