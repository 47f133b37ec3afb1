"""Merchants and their API keys.

A key is 32 random bytes (``pk_`` + URL-safe base64), shown once by ``payapp merchant create`` and stored only as
its SHA-256 (a fast hash is right for a high-entropy random secret; bcrypt-style stretching is for passwords and
would cost milliseconds per request). With ``PAYAPP_AUTH=apikey`` the key in ``Authorization: Bearer <key>``
decides the merchant; a ``merchantId`` in the request that differs is refused. Known keys are cached per worker
for a minute, so the hot path does not query MariaDB.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from payapp import db
from payapp.errors import ApiError, PayappError
from payapp.settings import DbTarget

CACHE_SECONDS = 60.0
_CACHE_MAX = 10_000


def new_api_key() -> str:
    return "pk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": "Bearer"})


class ApiKeys:
    """Resolves ``Authorization: Bearer`` keys to merchant ids, with a small per-worker cache."""

    def __init__(self, pool: db.Pool) -> None:
        self._pool = pool
        self._cache: dict[str, tuple[str, float]] = {}  # key hash -> (merchant id, expires at)

    async def merchant_for(self, authorization: str | None, claimed: str | None) -> str:
        """The merchant the request's key belongs to; 401 when there is no valid key or it names another merchant."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("missing API key: send Authorization: Bearer <key>")
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            merchant_id = cached[0]
        else:
            async with self._pool.acquire() as conn:
                rows = (await db.execute(conn, "SELECT merchant_id FROM merchant WHERE api_key_hash = %s", digest)).rows
            if not rows:
                raise unauthorized("invalid API key")
            merchant_id = rows[0][0]
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (merchant_id, now + CACHE_SECONDS)
        if claimed is not None and claimed != merchant_id:
            raise unauthorized("merchantId does not match the API key")
        return merchant_id


async def create_merchant(db_url: str, merchant_id: str, name: str, rotate: bool = False) -> str:
    """Create a merchant (or, with ``rotate``, give an existing one a new key); returns the new API key."""
    if not 1 <= len(merchant_id) <= 32 or not merchant_id.isprintable() or any(c.isspace() for c in merchant_id):
        raise PayappError(f"merchant id {merchant_id!r} must be 1-32 printable characters without spaces")
    key = new_api_key()
    conn = await db.connect(DbTarget.parse(db_url))
    try:
        if rotate:
            done = await db.execute(conn, "UPDATE merchant SET api_key_hash = %s WHERE merchant_id = %s",
                                    hash_key(key), merchant_id)
            if done.rowcount != 1:
                raise PayappError(f"merchant {merchant_id!r} does not exist", "create it without --rotate-key")
            return key
        try:
            await db.execute(
                conn, "INSERT INTO merchant (merchant_id, name, api_key_hash, created_at) VALUES (%s, %s, %s, %s)",
                merchant_id, name or merchant_id, hash_key(key), db.utcnow(),
            )
        except db.BatchError as exc:
            if exc.code == db.ER_DUP_ENTRY:
                raise PayappError(f"merchant {merchant_id!r} already exists",
                                  "use --rotate-key to issue it a new API key") from None
            raise PayappError(f"cannot create merchant: {exc.cause}", "run `payapp migrate` first?") from exc
        return key
    finally:
        conn.close()
