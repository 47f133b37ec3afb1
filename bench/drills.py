"""The full fault drills on a deployed lab, one after another, and the results table (docs/reliability.md).

    flock /run/payctl-lab-tests.lock sh -c 'payctl lab up -i lab-1node && payctl phase4 apply -i lab-1node --yes &&
        PAYCTL_HOME=... .venv/bin/python bench/drills.py -i lab-1node --rps 20 --duration 60s; payctl down ...'

Each scenario: constant payment flows through nginx, the fault after the warm-up, recovery, drain and the audit
(payctl.drill). Prints one table row per scenario as it finishes, then the whole table; writes results.json and
results.md into --out. Exits 1 when any drill failed (lost, duplicated, not recovered).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from payctl import drill
from payctl.errors import PayctlError
from payctl.gate import parse_duration
from payctl.inventory import load_inventory, resolve_inventory_path
from payctl.paths import payctl_home

DEFAULT = ("kill-app", "kill-app-all", "kill-relay", "kill-consumer", "kill-broker", "kill-redis", "partition",
           "restart-node", "disk-full")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--inventory", default="lab-1node")
    ap.add_argument("--rps", type=int, default=20)
    ap.add_argument("--duration", default="60s")
    ap.add_argument("--warmup", default="15s")
    ap.add_argument("--fault-duration", default="10s")
    ap.add_argument("--scenarios", default=",".join(DEFAULT))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    inv = load_inventory(args.inventory)
    out = args.out or Path("reports") / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{inv.deployment}-drills"
    results: list[drill.DrillResult] = []
    for name in args.scenarios.split(","):
        known = drill.SCENARIOS.get(name)
        spec = drill.DrillSpec(
            scenario=name,
            rps=args.rps,
            # disk-full needs longer: MariaDB retries a full disk every 60 s (its own defaults when they are longer)
            duration_s=max(parse_duration(args.duration), known.duration_s if known else 0.0),
            warmup_s=parse_duration(args.warmup),
            fault_s=parse_duration(args.fault_duration),
            recover_bound_s=known.recover_bound_s if known else 60.0,
        )
        try:
            plan = drill.plan_drill(inv, spec, home=payctl_home().absolute(),
                                    inventory_path=resolve_inventory_path(args.inventory))  # fmt: skip
            started = time.monotonic()
            result = drill.run_drill(plan, out / name, command=f"bench drills {name}")
        except PayctlError as exc:
            print(f"{name}: error: {exc.message} ({exc.hint})", file=sys.stderr)
            return 2
        results.append(result)
        row = drill.markdown_table([result]).splitlines()[-1]
        print(f"{row}   ({time.monotonic() - started:.0f}s with drain and audit)", flush=True)
        for p in result.problems:
            print(f"  {name}: {p}", flush=True)
    drill.write_results(results, out)
    print()
    print(f"{inv.deployment}, {args.rps}/s payment flows, {args.duration} per scenario, fault after {args.warmup}:")
    print(drill.markdown_table(results))
    print(f"results in {out}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
