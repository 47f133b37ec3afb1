"""Migrations: versioned, recorded, idempotent; the schema holds the ledger's rules by itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from payapp.migrate import available, migrate
from tests.app.conftest import AppDatabase, new_database
from tests.support.services import MariaDB


def test_migrate_creates_the_database_and_a_second_run_is_a_no_op(mariadb: MariaDB) -> None:
    database = AppDatabase(mariadb, "payapp_fresh_mig")
    try:
        versions = [m.version for m in available()]
        assert versions[0] == 1 and versions == sorted(versions)
        assert migrate(database.url) == versions
        assert migrate(database.url) == []
        recorded = database.rows("SELECT version, name FROM schema_migrations ORDER BY version")
        assert recorded[0] == ["1", "initial"]
        assert [int(r[0]) for r in recorded] == versions
        tables = {r[0] for r in database.rows("SHOW TABLES")}
        assert {"payment", "payment_operation", "ledger_entry", "outbox_event", "merchant", "idempotency_key",
                "schema_migrations"} <= tables
    finally:
        mariadb.sql("DROP DATABASE IF EXISTS payapp_fresh_mig")


def test_cli_migrate_uses_the_migrate_url_and_reports(mariadb: MariaDB, tmp_path: Path) -> None:
    name = "payapp_cli_mig"
    env = {**os.environ, "PAYAPP_DB_URL": "mysql://nobody:wrong@127.0.0.1:1/nothing",
           "PAYAPP_MIGRATE_DB_URL": mariadb.url(db=name)}
    payapp = str(Path(sys.executable).parent / "payapp")
    try:
        first = subprocess.run([payapp, "migrate"], env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("applied migrations 001")
        second = subprocess.run([payapp, "migrate"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and second.stdout.startswith("schema up to date"), second.stdout
    finally:
        mariadb.sql(f"DROP DATABASE IF EXISTS {name}")


def test_cli_migrate_unreachable_database_is_one_clear_error() -> None:
    env = {**os.environ, "PAYAPP_DB_URL": "mysql://root:x@127.0.0.1:1/payapp"}
    payapp = str(Path(sys.executable).parent / "payapp")
    out = subprocess.run([payapp, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("payapp: error: cannot connect to MariaDB at 127.0.0.1:1 as 'root'")
    assert "Traceback" not in out.stderr


def test_ledger_is_append_only_and_nothing_cascades(mariadb: MariaDB) -> None:
    database = new_database(mariadb, "payapp_rules")
    try:
        database.server.sql(
            "INSERT INTO payment (merchant_id, amount, currency, status, created_at, updated_at)"
            " VALUES ('m', 100, 'KRW', 'REQUESTED', NOW(6), NOW(6));"
            "INSERT INTO payment_operation (payment_id, kind, amount, created_at) VALUES (1, 'AUTHORIZE', 100, NOW(6));"
            "INSERT INTO ledger_entry (payment_id, operation_id, account, direction, amount, currency, created_at)"
            " VALUES (1, 1, 'a', 'DEBIT', 100, 'KRW', NOW(6));",
            db=database.name,
        )
        for statement in ("UPDATE ledger_entry SET amount = 1", "DELETE FROM ledger_entry"):
            with pytest.raises(RuntimeError, match="append-only"):
                database.server.sql(statement, db=database.name)
        with pytest.raises(RuntimeError, match="foreign key constraint fails"):
            database.server.sql("DELETE FROM payment", db=database.name)
        with pytest.raises(RuntimeError, match="ck_payment_amounts"):
            database.server.sql("UPDATE payment SET captured_amount = 101", db=database.name)
    finally:
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")
