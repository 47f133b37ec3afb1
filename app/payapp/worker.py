"""One ``payapp serve`` worker: ``python -m payapp.worker``, started by the master (``payapp.server``) only.

It reads its settings from the PAYAPP_* environment the master prepared, listens with SO_REUSEPORT on the shared
port, and on SIGTERM/SIGINT stops accepting, lets in-flight requests finish (up to PAYAPP_SHUTDOWN_TIMEOUT),
closes its pools and exits 0. It exits ``EXIT_NO_RESTART`` when its settings are bad or the port cannot be bound,
which tells the master that restarting it is pointless.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import uvloop
from aiohttp import web

from payapp.app import create_app
from payapp.errors import PayappError
from payapp.server import EXIT_NO_RESTART
from payapp.settings import Settings
from payapp.watchdog import EXIT_DRAIN_TIMEOUT, start_drain_watchdog

__all__ = ["EXIT_DRAIN_TIMEOUT", "drain", "main", "serve", "start_drain_watchdog"]

log = logging.getLogger("payapp.worker")

#: After the drain's own deadline (PAYAPP_SHUTDOWN_TIMEOUT for in-flight requests, then this for closing pools and
#: clients), a worker exits no matter what: a cleanup that never returns must not leave a process that holds memory
#: and DB connections forever (seen: orphaned workers of a dead master, 70+ min in their drain, ignoring SIGTERM).
CLEANUP_GRACE_SECONDS = 10.0


async def drain(runner: web.AppRunner, shutdown_timeout: float) -> int:
    """Stop accepting, let in-flight requests finish (aiohttp's shutdown_timeout), then close the app's pools and
    clients; returns 0, or EXIT_DRAIN_TIMEOUT when the whole drain overran shutdown_timeout + CLEANUP_GRACE_SECONDS."""
    budget = shutdown_timeout + CLEANUP_GRACE_SECONDS
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=budget)
    except TimeoutError:
        log.error("drain overran %.0fs (a pool or client did not close): exiting anyway", budget)
        return EXIT_DRAIN_TIMEOUT
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: Settings) -> int:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        keepalive_timeout=settings.keepalive_timeout,
        shutdown_timeout=settings.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        await runner.cleanup()
        return EXIT_NO_RESTART
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.gc_freeze:
        # Everything allocated at start-up lives as long as the process: keep it out of every collection.
        gc.collect()
        gc.freeze()
    log.info("worker listening on %s:%d", settings.host, settings.port)
    await stop.wait()
    log.info("draining: finishing in-flight requests (up to %.0fs)", settings.shutdown_timeout)
    # The loop-level deadline in drain() is the normal path; the watchdog is the backstop for a blocked loop or a
    # hang after it (closing the loop waits for executor threads). It stays armed until the process exits.
    start_drain_watchdog(settings.shutdown_timeout + CLEANUP_GRACE_SECONDS + 5.0)
    return await drain(runner, settings.shutdown_timeout)


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except PayappError as exc:
        print(f"payapp worker: {exc.message}", file=sys.stderr)
        return EXIT_NO_RESTART
    configure_logging(settings.log_level)
    if settings.gc_threshold is not None:
        gc.set_threshold(*settings.gc_threshold)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
