"""The downtime of `payctl upgrade` on ONE app node (lab-1node, phase 1): no peer carries traffic, so the node is
drained and restarted in place. Not a test: prints figures.

Measures both sides: the downtime payctl reports (SIGTERM to a healthy /health, polled every 0.5 s), and what a client
sees: a bounded probe loop (GET /health through nginx at 10.77.0.11, every 50 ms, at most 10 minutes) records each
failed probe; the client-side window is last failure - first failure (+ one probe interval). Then `payctl rollback`
is measured the same way. Runs as root, holds the lab lock (/run/payctl-lab-tests.lock), uses a throwaway
PAYCTL_HOME, tears the lab down at the end.

    .venv/bin/python bench/bench_upgrade_inplace.py        # ~4 minutes (lab up + phase 1 apply + 2 wheelhouses)
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYCTL = str(Path(sys.executable).parent / "payctl")
LOCK = Path("/run/payctl-lab-tests.lock")
URL = "http://10.77.0.11/health"
INTERVAL_S = 0.05


def payctl(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([PAYCTL, *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"payctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class Probe:
    """GET /health through nginx every INTERVAL_S until stopped (at most 10 minutes); failures are timestamped."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.failures: list[float] = []
        self.count = 0

    def _loop(self) -> None:
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            try:
                with urllib.request.urlopen(URL, timeout=2) as resp:
                    ok = resp.status == 200
            except (urllib.error.URLError, OSError):
                ok = False
            self.count += 1
            if not ok:
                self.failures.append(t)
            time.sleep(max(0.0, INTERVAL_S - (time.monotonic() - t)))

    def __enter__(self) -> Probe:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def window(self) -> float:
        return (self.failures[-1] - self.failures[0] + INTERVAL_S) if self.failures else 0.0


def measure(what: str, argv: list[str], env: dict[str, str]) -> None:
    with Probe() as probe:
        time.sleep(1)
        out = payctl(*argv, env=env)
        time.sleep(1)
    reported = re.search(r"downtime ([\d.]+)s", out)
    print(f"{what}: payctl reports downtime {reported.group(1) if reported else '?'} s; client saw "
          f"{len(probe.failures)} failed of {probe.count} probes, window {probe.window():.2f} s")  # fmt: skip
    for line in out.splitlines():
        if line.startswith("node1:"):
            print(f"  {line}")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_upgrade_inplace needs root (lab hosts)")
    home = Path(tempfile.mkdtemp(prefix="payctl-bench-"))
    source = home / "app-source"
    shutil.copytree(REPO / "app", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PAYCTL_HOME": str(home), "PAYCTL_APP_SOURCE": str(source)}
    new = home / "app-next"
    shutil.copytree(source, new)
    pyproject = new / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.1.1"'))
    with LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            payctl("lab", "up", "-i", "lab-1node", env=env)
            payctl("phase1", "apply", "-i", "lab-1node", "--yes", "--no-verify", env=env)
            measure("upgrade (one node, in place)", ["upgrade", "-i", "lab-1node", "--yes"],
                    {**env, "PAYCTL_APP_SOURCE": str(new)})  # fmt: skip
            measure("rollback (one node, in place)", ["rollback", "-i", "lab-1node", "--yes"], env)
            print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        finally:
            subprocess.run([PAYCTL, "down", "-i", "lab-1node", "--yes"], env=env, capture_output=True)
            subprocess.run([PAYCTL, "lab", "down", "-i", "lab-1node"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
