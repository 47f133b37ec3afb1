"""Id blocks: unique across workers, past any existing row, one reservation per block."""

from __future__ import annotations

import asyncio

from payapp import db, ids
from payapp.settings import Settings
from tests.app.conftest import new_database
from tests.support.services import MariaDB


async def test_blocks_are_disjoint_across_workers_and_skip_existing_rows(mariadb: MariaDB,
                                                                         settings: Settings) -> None:
    database = new_database(mariadb, "payapp_ids")
    try:
        # A row from before the sequences existed (or restored by hand) with a high id.
        mariadb.sql("INSERT INTO payment (payment_id, merchant_id, amount, currency, status, created_at, updated_at)"
                    " VALUES (4321, 'm', 1, 'KRW', 'REQUESTED', NOW(6), NOW(6))", db=database.name)
        pool = await db.create_pool(db.DbTarget.parse(database.url), 4, 10)
        try:
            workers = [ids.payment_ids(pool) for _ in range(3)]  # three workers' allocators
            drawn = await asyncio.gather(*(w.next() for w in workers for _ in range(ids.BLOCK + 5)))
            assert len(set(drawn)) == len(drawn)
            assert min(drawn) > 4321
            for w in workers:  # within a worker, increasing
                own = [await w.next() for _ in range(10)]
                assert own == sorted(own) and own[-1] - own[0] == 9
            # 3 workers x 2 blocks each: six reservations, not one per id.
            assert int(database.rows("SELECT NEXTVAL(payment_id_block)")[0][0]) == 4321 // ids.BLOCK + 1 + 6 + 1
        finally:
            pool.close()
            await pool.wait_closed()
    finally:
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")
