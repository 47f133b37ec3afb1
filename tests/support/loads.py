"""A bounded payment loop through the lab's nginx, for tests that change a deployment under load."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from payctl import drill
from payctl.drillaudit import LoadLog, parse_log

LB = "http://10.77.0.11"  # nginx on the lab's node1 (lab-1node and lab-2node)


def authorize(merchant: str, base: str = LB, timeout: float = 10) -> tuple[int, str]:
    """One authorization; (status, paymentId) on success, (status, start of the body) otherwise."""
    body = {"merchantId": merchant, "amount": 1000, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex}
    req = urllib.request.Request(f"{base}/payments/authorize", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, str(json.loads(resp.read()).get("paymentId", ""))
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()[:200]


@dataclass
class Load:
    """At most ``limit`` payments at about ``rps`` per second for at most ``max_s`` seconds, spread over
    ``merchants`` merchants, each result recorded: ``acked`` holds payment ids, ``failed`` "status detail" lines.
    ``settle_s``: traffic flows that long before the ``with`` body starts and after it ends."""

    rps: float = 20
    limit: int = 20000
    max_s: float = 900
    merchant: str = "m-load"
    merchants: int = 20
    settle_s: float = 0.0
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        start = time.monotonic()
        for i in range(self.limit):
            if self.stop.is_set() or time.monotonic() - start > self.max_s:
                return
            try:
                code, detail = authorize(f"{self.merchant}-{i % self.merchants}")
            except OSError as exc:
                code, detail = 0, repr(exc)
            if code in (200, 201):
                self.acked.append(detail)
            else:
                self.failed.append(f"{code} {detail}")
            delay = start + (i + 1) / self.rps - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        time.sleep(self.settle_s)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.settle_s)
        self.stop.set()
        self.thread.join(30)


@dataclass
class K6Load:
    """k6 (the drills' ``loadtest/drill.js``, authorizations only) at ``rps`` per second through the lab's nginx for
    the ``with`` body, at most ``max_s`` seconds. After it: ``acked`` holds the payment ids k6 saw acknowledged,
    ``failed`` one "status name at HH:MM:SS UTC" line per request that did not get a 200 (status 0: no answer within
    ``timeout_s``; drill.js retries a 5xx or no answer once with the same idempotency key: both attempts count),
    ``log`` the whole parsed k6 log."""

    rps: int = 20
    max_s: float = 900
    merchant: str = "m-k6"
    base: str = LB
    settle_s: float = 3.0
    timeout_s: float = 10.0
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    log: LoadLog = field(default_factory=LoadLog)

    def __enter__(self) -> K6Load:
        self._dir = tempfile.TemporaryDirectory(prefix="payctl-k6load-")
        self._log = Path(self._dir.name) / "k6.log"
        cmd, env = drill.k6_invocation(self.base, self.rps, self.max_s, self.merchant, self._log)
        # TIMEOUT: the Python loop's budget before it (10 s); drill.js's own 5 s is for partition drills.
        env.update({"CAPTURE_RATIO": "0", "REFUND_RATIO": "0", "TIMEOUT": f"{self.timeout_s:g}s"})
        self._stderr = (Path(self._dir.name) / "k6.stderr").open("wb")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                      env=env)  # fmt: skip
        self._started = time.monotonic()
        time.sleep(self.settle_s)
        if self._proc.poll() is not None:
            raise AssertionError(f"k6 exited {self._proc.returncode} at start: {self._read_stderr()}")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.settle_s)
        self.seconds = time.monotonic() - self._started
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # k6 stops its VUs and flushes the log
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._stderr.close()
        self.log = parse_log(self._log.read_text(errors="replace").splitlines() if self._log.exists() else [])
        self.acked = [str(a.payment_id) for a in self.log.authorized]
        self.failed = [f"{r.status} {r.name} at {time.strftime('%H:%M:%S', time.gmtime(r.t))} UTC"
                       for r in self.log.requests if r.status != 200]  # fmt: skip
        self._dir.cleanup()

    @property
    def rps_achieved(self) -> float:
        return self.log.sent / self.seconds if getattr(self, "seconds", 0) else 0.0

    def _read_stderr(self) -> str:
        self._stderr.flush()
        return (Path(self._dir.name) / "k6.stderr").read_text(errors="replace")[-2000:]
