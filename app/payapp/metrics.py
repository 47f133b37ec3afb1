"""Prometheus metrics of one app, summed across worker processes.

``payapp serve`` gives its workers a shared ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode,
chosen by that variable when prometheus_client is first imported): every worker writes its values to files there
and ``/metrics``, whichever worker answers, reads all of them. Without the variable (tests, ``create_app`` on its
own) the metrics live in this process's registry. Metrics belong to the ``Metrics`` object, never to a module global
registry, so two apps in one process do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RATE_LIMITED = ("authorize", "capture", "refund", "void")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("payapp_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("payapp_http_request_duration_seconds", "HTTP request latency",
                                 ["route", "method", "status"], buckets=_BUCKETS, registry=r)
        self.ratelimit_rejected = Counter("payapp_ratelimit_rejected", "Requests refused with 429", ["action"],
                                          registry=r)
        self.ratelimit_fallback = Counter(
            "payapp_ratelimit_fallback", "Rate-limit decisions taken by the local per-worker limiter (Redis down)",
            ["action"], registry=r)
        for action in RATE_LIMITED:  # zero from the start, so the series exist before the first 429
            self.ratelimit_rejected.labels(action)
            self.ratelimit_fallback.labels(action)
        self.redis_errors = Counter("payapp_ratelimit_redis_errors", "Failed calls to Redis by the rate limiter",
                                    registry=r)
        self.idempotent_replays = Counter("payapp_idempotent_replays", "Responses replayed for a repeated key",
                                          ["route"], registry=r)
        # livesum: each worker writes its own value, /metrics shows the sum over live workers.
        self.db_pool_size = Gauge("payapp_db_pool_size", "Open connections in the DB pools", registry=r,
                                  multiprocess_mode="livesum")
        self.db_pool_in_use = Gauge("payapp_db_pool_in_use", "DB connections lent out to requests", registry=r,
                                    multiprocess_mode="livesum")
        self.db_pool_waiting = Gauge("payapp_db_pool_waiting", "Requests waiting for (or opening) a DB connection",
                                     registry=r, multiprocess_mode="livesum")
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = self._children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition: every worker's values when in multiprocess mode, else this process's."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def sample_pool(self, pool: Any) -> None:
        """Pool gauges from an asyncmy pool (``_acquiring`` is private: 0 when a release renames it)."""
        size = int(pool.size)
        self.db_pool_size.set(size)
        self.db_pool_in_use.set(size - int(pool.freesize))
        self.db_pool_waiting.set(int(getattr(pool, "_acquiring", 0)))


async def sample_pool_every(metrics: Metrics, pool: Any, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Keep this worker's pool gauges fresh (each worker samples its own pool; /metrics sums them)."""
    while not stop.is_set():
        metrics.sample_pool(pool)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


@contextlib.asynccontextmanager
async def metrics_site(host: str, port: int, text: Callable[[], str]) -> AsyncIterator[None]:
    """A ``/metrics`` endpoint for the relay and the consumer (their own ports; 0 = none)."""
    if not port:
        yield
        return

    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=text(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host or "0.0.0.0", port).start()
        yield
    finally:
        await runner.cleanup()
