"""``create_app(settings)``: the aiohttp application, its typed state and the resources it opens and closes.

The database pool and the Redis client are opened by ``cleanup_ctx`` when the app starts and closed when it
stops, so an app can be created, served, and torn down any number of times in one process (tests do).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from payapp import api, db, openapi
from payapp.auth import ApiKeys
from payapp.codec import CODECS
from payapp.keys import API_KEYS, CODEC, DB_POOL, LIMITER, METRICS, PAYMENTS, REDIS, SETTINGS
from payapp.metrics import Metrics, sample_pool_every
from payapp.payments import Payments
from payapp.ratelimit import RateLimiter
from payapp.settings import Settings

REDIS_TIMEOUT_SECONDS = 0.25



def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=api.MAX_BODY_BYTES, middlewares=[api.middleware])
    app[SETTINGS] = settings
    app[CODEC] = CODECS[settings.json_lib]
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_redis)
    api.add_routes(app)
    app.router.add_get("/openapi.json", openapi.handler)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await db.create_pool(
        settings.db, settings.db_pool_size, settings.idempotency_lease_seconds, settings.db_pool_timeout_ms,
        settings.db_query_timeout_ms,
    )
    app[DB_POOL] = pool
    app[PAYMENTS] = Payments(pool, app[CODEC].dumps, settings.idempotency_lease_seconds)
    app[API_KEYS] = ApiKeys(pool)
    stop = asyncio.Event()
    gauges = asyncio.get_running_loop().create_task(sample_pool_every(app[METRICS], pool, stop))
    yield
    stop.set()
    await gauges
    pool.close()
    await pool.wait_closed()


def redis_client(settings: Settings) -> aioredis.Redis:
    """The Redis client: straight to REDIS_URL, or, with REDIS_SENTINELS, to the master the Sentinels name now.

    Through Sentinel the connection pool asks the Sentinels for the master on every new connection, so after a
    failover the broken connections are replaced by connections to the promoted replica.
    """
    timeouts = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}
    retry = Retry(NoBackoff(), 0)  # the limiter's fallback is the retry
    if not settings.redis_sentinels:
        return aioredis.Redis.from_url(settings.redis_url, retry=retry, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                       socket_connect_timeout=REDIS_TIMEOUT_SECONDS)  # fmt: skip
    url = urlsplit(settings.redis_url)
    sentinel_auth = {"username": settings.redis_sentinel_user or None,
                     "password": settings.redis_sentinel_password or None}  # fmt: skip
    addresses = [(host, int(port)) for host, _, port in (x.rpartition(":") for x in settings.redis_sentinels)]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        # No retries towards a Sentinel: a dead one (refused) is skipped at once for the next, instead of redis-py's
        # default backoff-and-retry eating the caller's whole timeout (seen in the lab: /health "redis: down").
        addresses, sentinel_kwargs={**sentinel_auth, **timeouts, "retry": Retry(NoBackoff(), 0)}, **timeouts
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        db=int(url.path.lstrip("/") or 0),
        retry=retry,
    )
    return client


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = redis_client(settings)
    app[REDIS] = client
    limits = {action: settings.rate_limit(action) for action in ("authorize", "capture", "refund", "void")}
    app[LIMITER] = RateLimiter(client, limits, settings.workers, settings.rate_limit_fail == "open", app[METRICS])
    yield
    await client.aclose()
