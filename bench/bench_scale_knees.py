"""Phase 5's gate on the lab, and the 1-node vs 2-node knees measured on this machine in one run. Not a test.

Issue 8's gate is `payctl verify --rps 1000` against the LB. Two lab hosts on one 2-core machine cannot show two
4-core VMs, so this bench reports, in one run on the same machine:

1. the 1-node knee: lab-1node at phase 4, `payctl verify --find-knee` with phase 5's criteria (mixed scenario,
   p95 <= 150 ms, p99 <= 300 ms, errors < 1 %; dropped iterations fail a step);
2. the deployment grown in place to lab-2node phase 5 (`payctl phase5 apply` = scale add-node);
3. the phase-5 gate as specified, `payctl verify -i lab-2node --phase 5 --rps 1000` (shortened: --duration, --warmup);
4. the 2-node knee, same criteria, and the ratio 2-node / 1-node.

Runs as root, holds the lab test lock (/run/payctl-lab-tests.lock: never collides with a test run), removes a lab
left on the machine first (like the tests), uses a throwaway PAYCTL_HOME, tears the lab down at the end. All load
goes to the lab LB 10.77.0.11 (a namespace this run created). Bounded: every k6 step has a fixed duration.

    .venv/bin/python bench/bench_scale_knees.py                       # ~25 minutes
    .venv/bin/python bench/bench_scale_knees.py --from 40 --to 400 --step 40 --duration 15s
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PAYCTL = [sys.executable, "-m", "payctl"]
LOCK = Path("/run/payctl-lab-tests.lock")
KNEE = re.compile(r"knee: (\d+)/s")
STEP = re.compile(r"^\s+(\d+)/s -> \s*([\d.]+)/s\s+p95 (\S+) ms\s+dropped (\d+)\s+(.*)$", re.M)


def payctl(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PAYCTL, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if check and proc.returncode != 0:
        sys.exit(f"payctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


knees: dict[str, int | None] = {}


def knee(inventory: str, phase: int, args: argparse.Namespace, env: dict[str, str], out: Path) -> dict[str, object]:
    t0 = time.monotonic()
    proc = payctl(
        "verify", "-i", inventory, "--phase", str(phase), "--find-knee", "--scenario", "mixed",
        "--from", str(args.start), "--to", str(args.to), "--step-size", str(args.step),
        "--duration", args.duration, "--warmup", args.warmup, "--p95", "150ms", "--p99", "300ms",
        "--max-error-rate", "0.01", "--cooldown", "5s", "--quiet", "--report-dir", str(out / f"knee-{inventory}"),
        env=env, check=False,
    )  # fmt: skip
    found = KNEE.search(proc.stdout)
    steps = [
        {"offered": int(m[0]), "achieved": float(m[1]), "p95_ms": m[2], "dropped": int(m[3]), "verdict": m[4]}
        for m in STEP.findall(proc.stdout)
    ]
    print(proc.stdout.strip())
    if proc.returncode != 0 and not steps:
        print(f"payctl verify --find-knee failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}", flush=True)
    knees[inventory] = int(found[1]) if found else None
    return {
        "inventory": inventory,
        "knee_rps": int(found[1]) if found else None,
        "steps": steps,
        "took_s": round(time.monotonic() - t0, 1),
        "exit": proc.returncode,
        "stderr": proc.stderr[-2000:],
        "load": loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", type=int, default=40, help="first rate of the knee search")
    parser.add_argument("--to", type=int, default=480, help="last rate of the knee search")
    parser.add_argument("--step", type=int, default=40, help="rate increment")
    parser.add_argument("--duration", default="15s", help="measured time per step")
    parser.add_argument("--warmup", default="5s", help="warm-up per step")
    parser.add_argument("--gate-duration", default="30s", help="measured time of the rps-1000 gate run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_scale_knees needs root (lab hosts)")
    from payctl import lab
    from payctl.inventory import load_inventory

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "out" / f"{stamp}-knees"
    out.mkdir(parents=True)
    home = Path(tempfile.mkdtemp(prefix="payctl-bench-"))
    source = home / "app-source"
    shutil.copytree(REPO / "app", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PAYCTL_HOME": str(home), "PAYCTL_APP_SOURCE": str(source)}
    one, two = load_inventory("lab-1node"), load_inventory("lab-2node")
    result: dict[str, object] = {"started": stamp, "args": vars(args)}
    with LOCK.open("a") as fh:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(fh, fcntl.LOCK_EX)
        scratch = Path(tempfile.mkdtemp(prefix="payctl-clear-"))
        lab.lab_down(two, scratch, force=True)  # a lab left on the machine (we hold the lab lock)
        try:
            lab.lab_up(one, home)
            t0 = time.monotonic()
            payctl("phase4", "apply", "-i", "lab-1node", "--yes", "--no-verify", env=env)
            print(f"lab-1node phase 4 applied in {time.monotonic() - t0:.0f} s (load {loadavg()})", flush=True)
            result["one_node"] = knee("lab-1node", 4, args, env, out)
            lab.lab_up(two, home)
            t0 = time.monotonic()
            payctl("phase5", "apply", "-i", "lab-2node", "--yes", "--no-verify", env=env)
            result["add_node_s"] = round(time.monotonic() - t0, 1)
            print(f"grown to lab-2node phase 5 in {result['add_node_s']} s (load {loadavg()})", flush=True)
            gate = payctl(
                "verify", "-i", "lab-2node", "--phase", "5", "--rps", "1000", "--duration", args.gate_duration,
                "--warmup", "10s", "--quiet", "--json", "--report-dir", str(out / "gate-rps1000"), env=env, check=False,
            )  # fmt: skip
            try:
                summary = json.loads(gate.stdout)
            except json.JSONDecodeError:
                summary = {"stdout": gate.stdout[-2000:], "stderr": gate.stderr[-2000:]}
            result["gate_rps1000"] = {"exit": gate.returncode, "summary": summary, "load": loadavg()}
            print(f"phase-5 gate at 1000/s: exit {gate.returncode}", flush=True)
            result["two_node"] = knee("lab-2node", 5, args, env, out)
        finally:
            lab.lab_down(two, home)
    k1, k2 = knees.get("lab-1node"), knees.get("lab-2node")
    result["ratio_two_over_one"] = round(k2 / k1, 2) if k1 and k2 else None
    (out / "knees.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n1-node knee {k1}/s, 2-node knee {k2}/s, ratio {result['ratio_two_over_one']}  ({out / 'knees.json'})")


if __name__ == "__main__":
    main()
