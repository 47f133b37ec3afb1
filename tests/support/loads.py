"""A bounded payment loop through the lab's nginx, for tests that change a deployment under load."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

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
