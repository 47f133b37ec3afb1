"""Every DB and Redis account payctl renders has exactly the privileges docs/security.md documents.

The rendered users SQL and replication SQL (lab-2node, phase 5, node1: the primary) run on a private real MariaDB;
the rendered Redis ACL lines load into a private real redis-server. The live grants (`SHOW GRANTS`) and the live
ACLs (`ACL DRYRUN`) are compared with the tables of the "Least privilege" section of docs/security.md.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import render
from payctl.secrets import SECRET_NAMES
from tests.support.services import MariaDB, free_port, wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
SECRETS = {name: f"pw-{name}-0123456789" for name in SECRET_NAMES}


def _files() -> dict[str, str]:
    files = render(make_plan(load_inventory("lab-2node"), load_phase(5)), SECRETS)
    return {key: f.text for key, f in files.items()}


def _section_rows(header: str) -> list[list[str]]:
    """The rows of the first table after ``header`` in the least-privilege section, as cells."""
    text = DOC.read_text().split("## Least privilege: database and Redis accounts", 1)[1]
    lines = text.split(header, 1)[1].splitlines()
    rows = []
    for line in lines[2:]:  # header line and separator done
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _privileges(grant: str) -> tuple[str, frozenset[str]]:
    privs, on = grant.split(" ON ")
    return on.replace("`", "").strip(), frozenset(p.strip() for p in privs.split(","))


# --------------------------------------------------------------------------------------------------- MariaDB


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    # A private server: users.sql deletes remote root accounts, which the session's shared server's users rely on.
    server = MariaDB(tmp_path_factory.mktemp("least-privilege")).start()
    try:
        files = _files()
        server.sql(files["node1/mariadb/users.sql"])
        server.sql(files["node1/mariadb/replication-primary.sql"])
        yield server
    finally:
        server.remove()


def _documented_grants() -> dict[str, set[tuple[str, frozenset[str]]]]:
    rows = _section_rows("| account | from | grants (besides `USAGE ON *.*`) |")
    return {_codes(r[0])[0]: {_privileges(g) for g in _codes(r[2])} for r in rows if _codes(r[0])[0] != "root"}


def test_every_db_account_has_exactly_the_documented_grants(db: MariaDB) -> None:
    documented = _documented_grants()
    assert set(documented) == {"app", "migrate", "exporter", "replication", "backup"}
    accounts = [line.split("\t") for line in db.sql("SELECT User, Host FROM mysql.user").splitlines()]
    ours = [(u, h) for u, h in accounts if u not in ("root", "mariadb.sys", "")]
    # Where each account may log in from: the app's from the app nodes, the others' from the DB nodes (lab-2node:
    # node1 and node2 run the app and MariaDB, the witness neither); the backup account (once the daily backup is
    # rendered) from the node itself only.
    nodes = ("10.77.0.11", "10.77.0.12")
    expected = [(u, h) for u in ("app", "migrate", "exporter", "replication") for h in nodes]
    if "backup" in {u for u, _ in ours}:
        expected.append(("backup", "localhost"))
    assert sorted(ours) == sorted(expected)
    for user, host in ours:
        live = set()
        for line in db.sql(f"SHOW GRANTS FOR '{user}'@'{host}'").splitlines():
            m = re.fullmatch(r"GRANT (.+?) TO `[^`]+`@`[^`]+`(?: IDENTIFIED BY PASSWORD '[^']*')?", line)
            assert m, line
            assert "WITH GRANT OPTION" not in line
            on, privs = _privileges(m.group(1))
            if privs != {"USAGE"}:
                live.add((on, privs))
        assert live == documented[user], (user, host, live)


def test_root_logs_in_only_through_the_local_socket(db: MariaDB) -> None:
    db.sql("CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY 'x'")  # what a careless image might ship
    db.sql(_files()["node1/mariadb/users.sql"])  # re-applying users.sql (every apply that changed it) removes it
    hosts = sorted(db.sql("SELECT Host FROM mysql.user WHERE User = 'root'").split())
    assert set(hosts) <= {"localhost", "127.0.0.1", "::1"}, hosts


def test_the_app_account_cannot_change_the_schema(db: MariaDB) -> None:
    db.sql("CREATE TABLE IF NOT EXISTS payments.t (id INT PRIMARY KEY)")
    db.sql("CREATE USER IF NOT EXISTS 'app'@'localhost' IDENTIFIED BY 'app-local'; "
           "GRANT SELECT, INSERT, UPDATE, DELETE ON payments.* TO 'app'@'localhost';")  # fmt: skip
    try:

        def as_app(statement: str) -> subprocess.CompletedProcess[str]:
            argv = ["mariadb", "--no-defaults", "-uapp", f"--socket={db.socket_path}", "payments", "-e", statement]
            env = {"PATH": "/usr/bin:/bin", "MYSQL_PWD": "app-local"}
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)

        assert as_app("INSERT INTO t VALUES (1); DELETE FROM t").returncode == 0
        for statement in ("DROP TABLE t", "ALTER TABLE t ADD c INT", "CREATE TABLE u (id INT)",
                          "SELECT * FROM mysql.user", "CREATE DATABASE other"):  # fmt: skip
            denied = as_app(statement)
            assert denied.returncode != 0 and "denied" in denied.stderr, statement
    finally:
        db.sql("DROP USER IF EXISTS 'app'@'localhost'; DROP TABLE IF EXISTS payments.t")


# --------------------------------------------------------------------------------------------------- Redis

ADMIN = "payctl-test-admin"


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    conf = _files()["node1/redis/redis.conf"]
    users = [line for line in conf.splitlines() if line.startswith("user ")]
    assert [u.split()[1] for u in users] == ["default", "app", "replication", "sentinel", "exporter"]
    base = tmp_path_factory.mktemp("redis-acl-all")
    port = free_port()
    # The rendered users, plus an admin of the test's own to read them with (not part of any deployment).
    (base / "redis.conf").write_text(f"bind 127.0.0.1\nport {port}\ndir {base}\nsave \"\"\n" + "\n".join(users)
                                     + f"\nuser {ADMIN} on >admin-pw ~* &* +@all\n")  # fmt: skip
    proc = subprocess.Popen(["redis-server", str(base / "redis.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(port=port, username=ADMIN, password="admin-pw", decode_responses=True)
    try:

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 20, "redis with the rendered ACL users")
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def _dryrun(client: redis.Redis, user: str, command: str) -> bool:
    answer = client.execute_command("ACL", "DRYRUN", user, *command.split())
    return bool(answer == "OK")


def test_every_redis_user_may_run_what_the_doc_says_and_nothing_it_forbids(acl: redis.Redis) -> None:
    rows = _section_rows("| user | may run (checked) | may not run (checked) |")
    documented = {_codes(r[0])[0]: (_codes(r[1]), _codes(r[2])) for r in rows}
    assert set(documented) == {"default", "app", "replication", "sentinel", "exporter"}
    live_users = set(acl.execute_command("ACL", "USERS")) - {ADMIN}
    assert live_users == set(documented)
    wrong = []
    for user, (may, may_not) in documented.items():
        wrong += [f"{user} cannot {c}" for c in may if not _dryrun(acl, user, c)]
        wrong += [f"{user} can {c}" for c in may_not if _dryrun(acl, user, c)]
    assert wrong == []


def test_no_redis_user_but_the_test_admin_has_every_command(acl: redis.Redis) -> None:
    for line in acl.execute_command("ACL", "LIST"):
        if f"user {ADMIN} " in line:
            continue
        assert "+@all" not in line and "allcommands" not in line, line
