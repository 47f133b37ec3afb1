"""``Batch.text`` escapes each distinct value once and must send exactly what the driver would have sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncmy

from payapp import db
from tests.support.services import MariaDB


async def test_text_is_the_drivers_own_escaping_with_repeated_values(mariadb: MariaDB) -> None:
    conn = await asyncmy.connect(**db.connect_kwargs(db.DbTarget.parse(mariadb.url(db="mysql"))))
    try:
        noon_utc = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        one_pm_plus_one = datetime(2026, 11, 25, 13, 0, tzinfo=timezone(timedelta(hours=1)))
        assert noon_utc == one_pm_plus_one  # one instant, two texts: must not share an escaped literal
        naive = datetime(2026, 11, 25, 12, 0, 0, 123456)
        values = ["it's", 1, True, 1, None, "it's", naive, naive, noon_utc, one_pm_plus_one, b"\x00'", 2.5, "x",
                  "\\ \n", 1.0, True]
        batch = db.Batch()
        batch.add("SELECT " + ", ".join(["%s"] * 8), *values[:8])
        batch.add("SELECT " + ", ".join(["%s"] * 8) + ", '%%'", *values[8:])
        expected = conn.cursor().mogrify(";\n".join(batch.sql), batch.args)
        assert batch.text(conn) == expected
        assert "'2026-11-25 12:00:00'" in expected and "'2026-11-25 13:00:00'" in expected
        assert db.Batch(["SELECT '%'"]).text(conn) == "SELECT '%'"  # no values: nothing is formatted
        rows = [r.rows for r in await batch.run(conn)]  # and MariaDB reads it back as sent
        assert rows[0][0][:2] == ("it's", 1) and rows[1][0][-1] == "%"
    finally:
        conn.close()
