"""``payapp serve``: a master process supervising N worker processes that share one port (SO_REUSEPORT).

The master never serves requests. It starts each worker as ``python -m payapp.worker`` with the settings in its
environment, restarts a worker that dies (unless it exits ``EXIT_NO_RESTART``: bad settings or port in use), and on
SIGTERM/SIGINT/SIGHUP forwards SIGTERM to every worker, waits for them to drain (PAYAPP_SHUTDOWN_TIMEOUT, then
SIGKILL) and exits. Workers die with their master: each asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so even a SIGKILLed master leaves no orphan serving traffic.

Workers write their metrics into one prometheus multiprocess directory (PAYAPP_METRICS_DIR, or a temporary one the
master creates and removes), so /metrics on any worker reports the totals of all of them.

The master handles signals synchronously (``sigtimedwait`` on a blocked set), so there are no handler races.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from payapp.errors import PayappError
from payapp.settings import Settings

EXIT_NO_RESTART = 78  # EX_CONFIG: a worker's settings are bad or the port cannot be bound
PR_SET_PDEATHSIG = 1
RESTART_DELAY_SECONDS = 1.0
KILL_GRACE_SECONDS = 5.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

log = logging.getLogger("payapp.server")


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float


def _child_setup(master_pid: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != master_pid:  # the master died before prctl took effect
            os._exit(1)

    return setup


class Master:
    def __init__(self, settings: Settings, environ: dict[str, str]) -> None:
        self.settings = settings
        self._own_metrics_dir = not settings.metrics_dir
        self.metrics_dir = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="payapp-metrics-"))
        self._env = {**environ, **settings.to_env(), "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        self.workers: dict[int, Worker] = {}
        self._restart_at: dict[int, float] = {}
        self._stopping_since: float | None = None
        self.exit_code = 0

    def _spawn(self, index: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "payapp.worker"],
            env={**self._env, "PAYAPP_WORKER_INDEX": str(index)},
            preexec_fn=_child_setup(os.getpid()),
        )
        self.workers[index] = Worker(index, proc, time.monotonic())

    def run(self) -> int:
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):  # totals restart with the service
            stale.unlink()
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for index in range(self.settings.workers):
                self._spawn(index)
            log.info("payapp serve: %d workers on %s:%d (master pid %d)", self.settings.workers,
                     self.settings.host, self.settings.port, os.getpid())
            while self.workers or (self._restart_at and self._stopping_since is None):
                info = signal.sigtimedwait(_SIGNALS, 0.5)
                if info is not None and info.si_signo != signal.SIGCHLD:
                    self.stop(f"signal {signal.Signals(info.si_signo).name}")
                self._reap()
                self._restart_due()
                self._kill_overdue()
        finally:
            for worker in self.workers.values():
                worker.proc.kill()
                worker.proc.wait()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            if self._own_metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("payapp serve: stopped")
        return self.exit_code

    def stop(self, why: str) -> None:
        if self._stopping_since is not None:
            return
        log.info("payapp serve: %s; draining %d workers", why, len(self.workers))
        self._stopping_since = time.monotonic()
        self._restart_at.clear()
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None:
                continue
            del self.workers[index]
            # A dead worker's "live" gauges must leave the totals (prometheus_client's mark_process_dead).
            for stale in self.metrics_dir.glob(f"gauge_live*_{worker.proc.pid}.db"):
                stale.unlink(missing_ok=True)
            if self._stopping_since is not None:
                continue
            if code == EXIT_NO_RESTART:
                self.exit_code = 1
                self.stop(f"worker {index} cannot run (exit {code}, see its log)")
                continue
            lived = time.monotonic() - worker.started
            log.warning("payapp serve: worker %d (pid %d) exited with %d after %.1fs; restarting", index,
                        worker.proc.pid, code, lived)
            self._restart_at[index] = time.monotonic() + (RESTART_DELAY_SECONDS if lived < 10 else 0)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._restart_at.items()):
            if when <= now:
                del self._restart_at[index]
                self._spawn(index)

    def _kill_overdue(self) -> None:
        if self._stopping_since is None:
            return
        if time.monotonic() - self._stopping_since > self.settings.shutdown_timeout + KILL_GRACE_SECONDS:
            for worker in self.workers.values():
                if worker.proc.poll() is None:
                    log.warning("payapp serve: worker %d did not drain in time; killing it", worker.index)
                    worker.proc.kill()


def serve(settings: Settings, environ: dict[str, str]) -> int:
    """Run the master until it is told to stop; returns the process exit code."""
    if sys.platform != "linux":
        raise PayappError("payapp serve needs Linux (SO_REUSEPORT, PR_SET_PDEATHSIG)")
    return Master(settings, environ).run()
