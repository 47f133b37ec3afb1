"""Benchmark: `payctl render --check -i inventories/ktcloud-2node.yml --phase 5` end to end (target < 3 s).

Runs the real console script as a user would (interpreter start-up, imports, plan, render, every validator) a few
times and prints each wall-clock time and the median. Needs root (the nginx/Redis checks use network namespaces).

    .venv/bin/python bench/bench_render.py [--runs 5] [--jobs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=4, help="validators in parallel (payctl render --jobs)")
    parser.add_argument("--inventory", default="inventories/ktcloud-2node.yml")
    parser.add_argument("--phase", type=int, default=5)
    args = parser.parse_args()
    payctl = REPO / ".venv" / "bin" / "payctl"
    cmd = [str(payctl), "render", "--check", "-i", args.inventory, "--phase", str(args.phase), "--jobs", str(args.jobs)]
    times: list[float] = []
    for i in range(args.runs):
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"run {i + 1}: payctl exited {proc.returncode}", file=sys.stderr)
            return 1
        summary = next((ln for ln in proc.stdout.splitlines() if " files passed in " in ln), "")
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.2f} s wall ({summary.strip()})")
    # The same work in one process, without interpreter start-up and CLI imports, to see where the time goes.
    from payctl.inventory import load_inventory
    from payctl.phase import load_phase
    from payctl.plan import make_plan
    from payctl.render import render
    from payctl.validate import validate_files

    inner: list[float] = []
    for _ in range(args.runs):
        start = time.monotonic()
        inv = load_inventory(REPO / args.inventory)
        files = render(make_plan(inv, load_phase(args.phase)))
        results = validate_files(files, [a for n in inv.nodes for a in (n.private_address, n.public_address) if a],
                                 jobs=args.jobs)  # fmt: skip
        inner.append(time.monotonic() - start)
        assert all(r.ok for r in results)
    start = time.monotonic()
    subprocess.run([str(payctl), "--version"], cwd=REPO, capture_output=True, check=True)
    startup = time.monotonic() - start
    print(f"in-process plan+render+check: median {statistics.median(inner):.2f} s; `payctl --version` (start-up and "
          f"imports): {startup:.2f} s")
    median = statistics.median(times)
    verdict = "meets" if median < TARGET_S else "MISSES"
    print(f"\n{' '.join(cmd[1:])}")
    # Shared 2-core machine: the figure means little without the load other work put on it meanwhile.
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"median {median:.2f} s, min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} runs "
          f"-> {verdict} the {TARGET_S:.0f} s target")
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
