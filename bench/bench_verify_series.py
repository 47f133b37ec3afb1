"""Benchmark: how big k6's per-sample output is, and what payctl's streamed bucketing costs instead.

Runs loadtest/payments.js (scenario authorize) at --rps for --duration twice against a loopback target:
1. plain `k6 run --out json=FILE` (what a naive gate would keep): file size, lines, bytes per request;
2. payctl's `run_load` (the same samples through a named pipe into the per-second bucketer): nothing on disk;
   prints the Python process's CPU time and peak RSS, and whether k6 kept the rate.

Without --url it starts a minimal in-process aiohttp stand-in for the payment API (the figure measured is k6's output
volume, which does not depend on the server as long as the responses are the same shape). Loopback only.

    .venv/bin/python bench/bench_verify_series.py [--rps 1000] [--duration 30] [--url http://127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from payctl.gate import GateSpec, check_target
from payctl.loadrun import SYSTEM_TAGS, find_k6, free_port, k6_env, run_load, script_path

_STAND_IN = """
import itertools, sys
from aiohttp import web
ids = itertools.count(1)
async def authorize(request):
    body = await request.json()
    return web.json_response({"paymentId": next(ids), "status": "REQUESTED", "amount": body["amount"],
                              "currency": body["currency"]})
async def health(_):
    return web.json_response({"status": "ok"})
app = web.Application()
app.add_routes([web.get("/health", health), web.post("/payments/authorize", authorize)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def _stand_in(port: int) -> subprocess.Popen[bytes]:
    """A process answering authorize with payapp's JSON shape (stopped by its pid at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", _STAND_IN, str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the stand-in server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--url", default=None, help="a loopback payment API (default: start a stand-in)")
    args = parser.parse_args()
    stand_in = None
    if args.url is None:
        port = free_port()
        stand_in = _stand_in(port)
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.url
    try:
        return _bench(args, url)
    finally:
        if stand_in is not None:
            stand_in.terminate()
            stand_in.wait(10)


def _bench(args: argparse.Namespace, url: str) -> int:
    target = check_target(url, None)
    spec = GateSpec(rps=args.rps, duration_s=args.duration, warmup_s=0, p95_ms=1000, p99_ms=2000,
                    max_error_rate=0.01, scenario="authorize", merchants=100)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-k6-") as tmp:
        out = Path(tmp) / "samples.json"
        env = {**os.environ, **k6_env(spec, target, Path(tmp) / "summary.json")}
        cmd = [find_k6(), "run", "--quiet", "--no-usage-report", "--address", f"127.0.0.1:{free_port()}",
               "--system-tags", SYSTEM_TAGS, "--out", f"json={out}", str(script_path())]  # fmt: skip
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False).returncode
        wall = time.monotonic() - t0
        size = out.stat().st_size
        with out.open("rb") as fh:
            lines = sum(1 for _ in fh)
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        reqs = int(summary["metrics"]["http_reqs{scenario:measure}"]["values"]["count"])
    print(f"1. k6 --out json=FILE at {args.rps}/s for {args.duration:g}s (k6 exit {rc}, {wall:.1f}s wall):")
    print(f"   {reqs} requests, {lines} lines, {size / 1e6:.1f} MB, {size / max(reqs, 1):.0f} bytes per request")

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    res = run_load(spec, target)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    s = res.summary
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(f"2. payctl run_load (pipe + bucketer) at {args.rps}/s for {args.duration:g}s ({wall:.1f}s wall):")
    print(f"   {s.requests} requests, achieved {s.achieved_rps:.1f}/s, dropped {s.dropped}, p95 {s.p95_ms:.2f} ms; "
          f"{len(res.series)} one-second points kept; 0 bytes of samples on disk")  # fmt: skip
    print(f"   this Python process: {cpu:.1f}s CPU (the bucketer; k6 and the server are other processes), "
          f"peak RSS {r1.ru_maxrss / 1024:.0f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
