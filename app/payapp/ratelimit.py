"""Per-merchant, per-action rate limit: one counter in Redis shared by every worker of every server.

The counter is a fixed one-minute window that starts with the merchant's first request: a single Lua script
increments it and sets its expiry in the same atomic step (a counter can never be left without one), and returns
the count with the time left, which becomes ``Retry-After``. The checks a worker makes in the same event-loop
iteration go to Redis together, as one call of the script over all their keys (``_Coalescer``): under load that
is a fraction of a Redis round trip per request, with exactly the same per-key semantics.

When Redis is unreachable the default is to *fail open* onto a local limiter in each worker, allowing its share of
the budget (limit / workers per minute), so a Redis outage neither stops payments nor lifts the limit. Each such
decision is counted (``payapp_ratelimit_fallback_total``) and the outage is logged when it starts and ends. After
a Redis error the limiter stays local for ``retry_seconds`` before trying Redis again, so an outage costs one
timeout per worker per interval, not one per request. ``PAYAPP_RATE_LIMIT_FAIL=closed`` rejects instead (503).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from payapp.errors import ApiError
from payapp.metrics import Metrics

log = logging.getLogger("payapp.ratelimit")

WINDOW_SECONDS = 60

# KEYS: counters; ARGV[1]: window in ms. Returns {count1, ms left1, count2, ms left2, ...}.
_SCRIPT = """
local out = {}
for _, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then
    redis.call('PEXPIRE', key, ARGV[1])
  end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
    ttl = tonumber(ARGV[1])
  end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return out
"""


class _Coalescer:
    """Sends the counter increments requested within one event-loop iteration as one script call."""

    def __init__(self, script: AsyncScript) -> None:
        self._script = script
        self._pending: list[tuple[str, asyncio.Future[tuple[int, int]]]] = []

    async def incr(self, key: str) -> tuple[int, int]:
        """(count, ms left in the window) of ``key`` after incrementing it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._pending.append((key, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        task.add_done_callback(_ignore)

    async def _send(self, batch: list[tuple[str, asyncio.Future[tuple[int, int]]]]) -> None:
        try:
            reply = await self._script(keys=[key for key, _ in batch], args=[WINDOW_SECONDS * 1000])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for i, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result((int(reply[2 * i]), int(reply[2 * i + 1])))


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int  # seconds until the window resets


class LocalLimiter:
    """Fixed one-minute windows in this process only: the fallback while Redis is down."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count]

    def hit(self, action: str, merchant_id: str, limit: int, now: float) -> Decision:
        key = (action, merchant_id)
        window = self._windows.get(key)
        if window is None or now - window[0] >= WINDOW_SECONDS:
            if len(self._windows) > 100_000:
                self._windows = {k: w for k, w in self._windows.items() if now - w[0] < WINDOW_SECONDS}
            window = self._windows[key] = [now, 0]
        window[1] += 1
        retry = max(1, math.ceil(window[0] + WINDOW_SECONDS - now))
        return Decision(window[1] <= limit, retry)


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        limits: dict[str, int],
        workers: int,
        fail_open: bool,
        metrics: Metrics,
        retry_seconds: float = 1.0,
    ) -> None:
        self._counters = _Coalescer(redis.register_script(_SCRIPT))
        self._limits = limits
        self._local_limits = {action: max(1, limit // workers) for action, limit in limits.items()}
        self._fail_open = fail_open
        self._metrics = metrics
        self._retry_seconds = retry_seconds
        self._local = LocalLimiter()
        self._down_until = 0.0  # monotonic time before which Redis is not tried
        self._outage = False

    async def check(self, action: str, merchant_id: str) -> Decision:
        now = time.monotonic()
        if now >= self._down_until:
            try:
                count, ttl_ms = await self._counters.incr(f"payapp:rl:{action}:{merchant_id}")
            except (RedisError, OSError) as exc:
                self._redis_failed(exc, now)
            else:
                if self._outage:
                    self._outage = False
                    log.warning("rate limit: Redis is reachable again; back to the shared counter")
                return Decision(count <= self._limits[action], max(1, math.ceil(ttl_ms / 1000)))
        if not self._fail_open:
            raise ApiError(503, "SERVICE_UNAVAILABLE", "rate limiter unavailable; retry later",
                           headers={"Retry-After": str(math.ceil(self._retry_seconds))})
        self._metrics.ratelimit_fallback.labels(action).inc()
        return self._local.hit(action, merchant_id, self._local_limits[action], now)

    async def enforce(self, action: str, merchant_id: str) -> None:
        """Raise RATE_LIMIT_EXCEEDED (429, with Retry-After) when the merchant is over its limit for ``action``."""
        decision = await self.check(action, merchant_id)
        if not decision.allowed:
            self._metrics.ratelimit_rejected.labels(action).inc()
            raise ApiError(429, "RATE_LIMIT_EXCEEDED", f"rate limit for {action} exceeded; retry later",
                           headers={"Retry-After": str(decision.retry_after)})

    def _redis_failed(self, exc: BaseException, now: float) -> None:
        self._down_until = now + self._retry_seconds
        self._metrics.redis_errors.inc()
        if not self._outage:
            self._outage = True
            mode = "each worker enforces its share locally" if self._fail_open else "rejecting (fail closed)"
            log.warning("rate limit: Redis unreachable (%s: %s); %s", type(exc).__name__, exc, mode)
