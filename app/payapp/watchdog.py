"""A hard deadline for a process that is stopping: a daemon thread that ``os._exit``s after ``seconds``.

Used by the API workers' drain (``payapp.worker``) and by the relay, consumer and reconcile scheduler after SIGTERM
(``payapp.eventcli``): a cleanup that never returns (a client waiting for a broker that is gone, a blocked event
loop) must neither hold the process forever nor leave it to supervisord's SIGKILL.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("payapp.watchdog")

EXIT_DRAIN_TIMEOUT = 3  # the drain overran its deadline; the master logs it and does not restart a stopping worker


def start_drain_watchdog(seconds: float, exit_code: int = EXIT_DRAIN_TIMEOUT) -> threading.Thread:
    """Hard deadline that works even if the event loop is blocked: a daemon thread that ``os._exit``s after
    ``seconds`` unless the process has exited by then."""

    def fire() -> None:
        time.sleep(seconds)
        log.error("drain did not finish within %.0fs: exiting now", seconds)
        logging.shutdown()
        os._exit(exit_code)

    thread = threading.Thread(target=fire, name="drain-watchdog", daemon=True)
    thread.start()
    return thread
