"""Payment and operation ids, allocated by each worker from blocks of ids it reserves in MariaDB.

Why not AUTO_INCREMENT: authorize sends its whole transaction (claim, payment, operation, ledger pair, outbox event)
in one round trip, so the new payment's and operation's ids must be known before the statements leave. A worker
reserves ``BLOCK`` consecutive ids with one ``NEXTVAL`` of a sequence (migration 003; non-transactional, so a
rolled-back payment leaves a gap, as AUTO_INCREMENT does) and hands them out from memory: one round trip per
thousand payments. Ids are unique, positive and increasing within a worker, but not in time order across workers
or restarts (a restarted worker abandons the rest of its block); nothing relies on that: events are ordered by
``outbox_event.id`` and by the per-payment ``sequence``.

Every payment and every operation takes its id from here, never from AUTO_INCREMENT (mixing the two in one column
would let AUTO_INCREMENT hand out an id inside a block a worker still holds). When a database already has rows
(ids from before migration 003), the first block is moved past the highest existing id.
"""

from __future__ import annotations

import asyncio

from payapp import db

BLOCK = 1000


class IdBlocks:
    """Ids of one table, from the blocks of sequence ``sequence``; ``column`` of ``table`` is where they go."""

    def __init__(self, pool: db.Pool, sequence: str, table: str, column: str) -> None:
        self._pool = pool
        self._sequence = sequence
        self._table = table
        self._column = column
        self._next = 0
        self._end = 0  # exclusive
        self._lock = asyncio.Lock()

    async def next(self) -> int:
        if self._next >= self._end:
            # Bounded like a query: a reservation that hangs (MariaDB cannot commit NEXTVAL, e.g. a full binlog disk)
            # must not hold every request of the worker queued on the lock behind it.
            bound = self._pool.query_timeout
            try:
                async with asyncio.timeout(bound), self._lock:
                    if self._next >= self._end:
                        await self._reserve()
            except TimeoutError:
                raise db.QueryTimeout(f"no {self._table} id block from MariaDB within {bound:g}s") from None
        value = self._next
        self._next += 1
        return value

    async def _reserve(self) -> None:
        async with self._pool.acquire() as conn:
            batch = db.Batch()
            batch.add(f"SELECT NEXTVAL({self._sequence})")
            batch.add(f"SELECT IFNULL(MAX({self._column}), 0) FROM {self._table}")
            block, highest = (int(r.rows[0][0]) for r in await batch.run(conn))
            if (block - 1) * BLOCK < highest:
                # Rows older than the sequence: jump past them (SETVAL never moves a sequence backwards).
                await db.execute(conn, f"SELECT SETVAL({self._sequence}, %s)", highest // BLOCK + 1)
                block = int((await db.execute(conn, f"SELECT NEXTVAL({self._sequence})")).rows[0][0])
        self._next, self._end = (block - 1) * BLOCK + 1, block * BLOCK + 1


def payment_ids(pool: db.Pool) -> IdBlocks:
    return IdBlocks(pool, "payment_id_block", "payment", "payment_id")


def operation_ids(pool: db.Pool) -> IdBlocks:
    return IdBlocks(pool, "operation_id_block", "payment_operation", "operation_id")
