"""Versioned schema migrations: ``payapp/migrations/NNN_name.sql``, applied in order, each once.

``schema_migrations(version, name, applied_at)`` records what ran. A file is sent whole (multi-statement protocol)
and recorded only after all its statements succeeded; MariaDB DDL is not transactional, so every statement in a
file must be idempotent (``CREATE ... IF NOT EXISTS``) and a failed file is simply re-run by the next migrate.
A named lock (``GET_LOCK``) serialises concurrent ``payapp migrate`` runs, e.g. two servers deploying at once.
The database itself is created when it does not exist yet.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from importlib import resources

import asyncmy

from payapp import db
from payapp.errors import PayappError
from payapp.settings import DbTarget

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_LOCK = "payapp.migrate"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped in the package, in version order; a malformed or duplicate name is an error."""
    found: dict[int, Migration] = {}
    for entry in resources.files("payapp").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.match(entry.name)
        if not match:
            raise PayappError(f"migration file {entry.name} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise PayappError(f"two migrations with version {version}: {found[version].name} and {match.group(2)}")
        found[version] = Migration(version, match.group(2), entry.read_text())
    return [found[v] for v in sorted(found)]


async def migrate_async(db_url: str) -> list[int]:
    """Apply every migration not yet recorded; returns the versions applied now (empty: nothing to do)."""
    target = DbTarget.parse(db_url)
    conn = await _connect_creating_database(target)
    try:
        lock = await db.execute(conn, "SELECT GET_LOCK(%s, 60)", _LOCK)
        if lock.rows[0][0] != 1:
            raise PayappError("another `payapp migrate` holds the migration lock", "wait for it and run again")
        try:
            await db.execute(
                conn,
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INT NOT NULL PRIMARY KEY, "
                "name VARCHAR(255) NOT NULL, applied_at DATETIME(6) NOT NULL) ENGINE=InnoDB",
            )
            done = {row[0] for row in (await db.execute(conn, "SELECT version FROM schema_migrations")).rows}
            applied: list[int] = []
            for migration in available():
                if migration.version in done:
                    continue
                await _apply(conn, migration)
                applied.append(migration.version)
            return applied
        finally:
            await db.execute(conn, "SELECT RELEASE_LOCK(%s)", _LOCK)
    except asyncmy.errors.MySQLError as exc:
        raise PayappError(f"migration failed: {exc}", "fix the cause and run `payapp migrate` again") from exc
    finally:
        conn.close()


def migrate(db_url: str) -> list[int]:
    """Synchronous ``migrate_async`` for callers without an event loop (the CLI, test fixtures).

    Called from inside a running loop it runs on a helper thread with its own loop, so it never nests loops.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(migrate_async(db_url))
    box: dict[str, list[int] | BaseException] = {}

    def work() -> None:
        try:
            box["ok"] = asyncio.run(migrate_async(db_url))
        except BaseException as exc:  # re-raised on the caller's thread
            box["err"] = exc

    thread = threading.Thread(target=work, name="payapp-migrate")
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["ok"]  # type: ignore[return-value]


async def _connect_creating_database(target: DbTarget) -> asyncmy.Connection:
    try:
        return await db.connect(target)
    except asyncmy.errors.MySQLError as exc:
        if db.error_code(exc) != db.ER_BAD_DB_ERROR:
            raise PayappError(
                f"cannot connect to MariaDB at {target.host}:{target.port} as {target.user!r}: {exc}",
                "check PAYAPP_MIGRATE_DB_URL / PAYAPP_DB_URL and that MariaDB is running",
            ) from exc
    conn = await db.connect(target, database=False)
    try:
        await db.execute(
            conn,
            f"CREATE DATABASE IF NOT EXISTS `{_ident(target.database)}` "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        )
        await db.execute(conn, f"USE `{_ident(target.database)}`")
    except BaseException:
        conn.close()
        raise
    return conn


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_$]{1,64}", name):
        raise PayappError(f"database name {name!r} is not a plain identifier")
    return name


async def _apply(conn: asyncmy.Connection, migration: Migration) -> None:
    try:
        await db.Batch([migration.sql]).run(conn)
    except db.BatchError as exc:
        raise PayappError(
            f"migration {migration.version:03d}_{migration.name} failed at statement {exc.index + 1}: {exc.cause}",
            "fix the cause (or the file) and run `payapp migrate` again",
        ) from exc
    await db.execute(
        conn, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
        migration.version, migration.name, db.utcnow(),
    )
