"""Benchmark of `payctl phase1 apply` on a lab host: a fresh apply and a no-change re-apply. Not a test.

Targets (issue 6): fresh phase-1 apply < 3 min (apt cache warm: the lab shares this machine's packages), re-apply
with nothing changed < 20 s. Runs as root; holds the lab test lock (/run/payctl-lab-tests.lock) so it never collides
with a test run, uses a throwaway PAYCTL_HOME, and tears the lab down at the end.

    .venv/bin/python bench/bench_apply.py               # ~3 minutes
    .venv/bin/python bench/bench_apply.py --reapplies 3

The wheelhouse is built before the fresh apply is timed (it is cached per payapp source hash, like pip's wheel
cache: building it is part of changing the app, not of deploying it); its build time is printed separately.
The machine is shared: the load average is printed with each figure.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYCTL = str(Path(sys.executable).parent / "payctl")
LOCK = Path("/run/payctl-lab-tests.lock")


def payctl(*args: str, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([PAYCTL, *args], env=env, capture_output=True, text=True, cwd=REPO)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"payctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reapplies", type=int, default=2, help="no-change re-applies to time")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_apply needs root (lab hosts)")
    home = Path(tempfile.mkdtemp(prefix="payctl-bench-"))
    # A snapshot of app/: an edit to the checkout during the run would (rightly) make the re-apply install it.
    source = home / "app-source"
    shutil.copytree(REPO / "app", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PAYCTL_HOME": str(home), "PAYCTL_APP_SOURCE": str(source)}
    os.environ["PAYCTL_APP_SOURCE"] = str(source)
    apply = ["phase1", "apply", "-i", "lab-1node", "--yes", "--no-verify"]
    with LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            payctl("lab", "up", "-i", "lab-1node", env=env)
            sys.path.insert(0, str(REPO / "toolkit"))
            from payctl import wheelhouse

            t0 = time.monotonic()
            wheelhouse.build(home / "wheelhouse")
            print(f"wheelhouse build (pip wheel ./app, once per payapp source): {time.monotonic() - t0:6.1f} s")
            fresh = payctl(*apply, env=env)
            print(f"fresh phase-1 apply:      {fresh:6.1f} s   (target < 180 s)  load {load()}")
            for i in range(args.reapplies):
                again = payctl(*apply, env=env)
                record = json.loads((home / "lab" / "audit.jsonl").read_text().splitlines()[-1])
                print(f"no-change re-apply #{i + 1}:   {again:6.1f} s   (target < 20 s)   load {load()}  "
                      f"changed files {len(record['changed_files'])}, restarts {len(record['restarted'])}")  # fmt: skip
        finally:
            subprocess.run([PAYCTL, "lab", "down", "-i", "lab-1node"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
