"""Benchmark: the full payment flow with the event pipeline running, on this machine, loopback only.

Starts a private MariaDB, Redis and Apache Kafka (tests/support), migrates a database, runs `payapp serve`,
`payapp relay` and `payapp consume`, then drives k6 constant-arrival-rate steps where one iteration is one payment:
authorize, then capture (so each payment makes two HTTP requests, two API events and one settlement).

Per step it prints: payments/s achieved, HTTP p50/p95/p99 over both requests, errors, dropped iterations, the
largest backlog seen (unpublished outbox rows + consumer lag) and the backlog left at the end of the step, and the
end-to-end latency capture → settlement row (p50/p95, from the database, after the step has drained). Then the
highest rate with HTTP p95 <= 25 ms, 0 errors and a bounded backlog (what is left at the end of the step is under
one second of traffic), and a CPU profile: CPU seconds per process during the last step.

    .venv/bin/python bench/bench_pipeline.py [--rates 200,400,600] [--duration 15] [--workers 1]
    .venv/bin/python bench/bench_pipeline.py --rates 50,100,200 --duration 10 --compare HEAD~3 [--profile]

``--compare REF`` is the before/after in one run: each rate is run twice in a row, first with app/payapp as it is in
git revision REF (exported to a temp dir and put first on PYTHONPATH of serve, relay and consume), then with the
working tree (or ``--new REF2``), on the same MariaDB, Kafka and machine load; the processes are restarted between
the two. Per step it also prints CPU milliseconds per payment of each process and MariaDB's statement, commit and
fsync counts per payment (SHOW GLOBAL STATUS deltas; they include the bench's own three backlog queries a second).

Every step is bounded (k6 --duration, a drain deadline); every process is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.kafka import Kafka  # noqa: E402
from tests.support.services import MariaDB, Redis, free_port, wait_until  # noqa: E402

VENV = REPO / ".venv" / "bin"

K6_SCRIPT = r"""
import http from "k6/http";
import { check } from "k6";
import exec from "k6/execution";
const BASE = __ENV.BASE_URL;
const RATE = parseInt(__ENV.RATE, 10);
export const options = {
  discardResponseBodies: false,
  scenarios: { flow: { executor: "constant-arrival-rate", rate: RATE, timeUnit: "1s", duration: __ENV.DURATION,
                       preAllocatedVUs: Math.max(20, RATE / 5), maxVUs: Math.max(100, RATE) } },
  summaryTrendStats: ["p(50)", "p(95)", "p(99)", "max"],
};
const params = { headers: { "Content-Type": "application/json" } };
export default function () {
  const it = exec.scenario.iterationInTest;
  const merchant = `bm${it % 200}`;
  const a = http.post(`${BASE}/payments/authorize`, JSON.stringify({ merchantId: merchant, amount: 1000 + (it % 97),
    currency: "KRW", idempotencyKey: `${__ENV.RUN}-${it}` }), params);
  if (!check(a, { "authorized": (r) => r.status === 200 })) return;
  const id = a.json("paymentId");
  const c = http.post(`${BASE}/payments/capture/${id}`, JSON.stringify({ merchantId: merchant }), params);
  check(c, { "captured": (r) => r.status === 200 });
}
"""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def tree(pid: int) -> list[int]:
    """pid and its descendants (payapp serve's workers)."""
    out = [pid]
    for child in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out += tree(int(child.name))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,400,600,800", help="payments per second, one k6 step each")
    ap.add_argument("--duration", type=int, default=15, help="seconds per step")
    ap.add_argument("--workers", type=int, default=1, help="payapp serve worker processes")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--api-only", action="store_true", help="no relay and consumer: the API's own ceiling")
    ap.add_argument("--profile", action="store_true",
                    help="run relay and consumer under cProfile (CPU time, not wall time); print their top functions")
    ap.add_argument("--compare", metavar="REF", default=None,
                    help="before/after: run each rate with app/payapp of git revision REF, then with the work tree")
    ap.add_argument("--new", metavar="REF", default=None,
                    help="with --compare: the 'after' is app/payapp of git revision REF instead of the work tree "
                         "(leaves out uncommitted changes in a shared tree)")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    variants = ["base", "new"] if args.compare else ["new"]

    base = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    mariadb = MariaDB(base / "mariadb", extra={"innodb_buffer_pool_size": "512M"})
    redis = Redis(base / "redis")
    kafka = Kafka(base / "kafka")
    try:
        mariadb.start()
        redis.start()
        kafka.start()
    except BaseException:  # also Ctrl-C while Kafka starts: nothing is left running
        for service in (kafka, redis, mariadb):
            with contextlib.suppress(Exception):
                service.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYAPP_")} | {
        "PAYAPP_DB_URL": mariadb.url(db="bench"), "PAYAPP_REDIS_URL": redis.url(),
        "PAYAPP_KAFKA_BOOTSTRAP": kafka.bootstrap, "PAYAPP_HOST": "127.0.0.1", "PAYAPP_PORT": str(port),
        "PAYAPP_WORKERS": str(args.workers), "PAYAPP_LOG_LEVEL": "warning",
        "PAYAPP_RECONCILE_SETTLE_LAG_S": "0",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sources: dict[str, Path] = {}  # variant -> exported tree whose app/ goes first on PYTHONPATH
    for variant, ref in (("base", args.compare), ("new", args.new if args.compare else None)):
        if ref:
            sources[variant] = base / f"src-{variant}"
            sources[variant].mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "app/payapp"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(sources[variant])], input=archive, check=True)
    profiles: list[tuple[str, Path]] = []

    def start(name: str, variant: str, *argv: str) -> None:
        log = open(base / f"{name}-{variant}.log", "ab")  # noqa: SIM115
        cmd = [str(VENV / "payapp"), *argv]
        if args.profile and name in ("relay", "consume"):
            # CPU time (process_time), not cProfile's default wall clock: on a loaded machine the wall clock
            # charges other processes' time slices to whatever call was running. SIGTERM makes them return
            # normally, so the file gets written.
            prof = base / f"{name}-{variant}-{len(profiles)}.prof"
            profiles.append((f"{name} ({variant})", prof))
            cmd = [str(VENV / "python"), "-c",
                   "import cProfile, time; from payapp.cli import main; p = cProfile.Profile(time.process_time)\n"
                   f"try:\n    p.runcall(main, {list(argv)!r})\nfinally:\n    p.dump_stats({str(prof)!r})"]
        penv = env | ({"PYTHONPATH": str(sources[variant] / "app")} if variant in sources else {})
        procs[name] = subprocess.Popen(cmd, env=penv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop_all() -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        procs.clear()

    def run_variant(variant: str) -> None:
        stop_all()
        start("serve", variant, "serve")
        if not args.api_only:
            start("relay", variant, "relay")
            start("consume", variant, "consume")
        wait_until(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/health"],
                                          capture_output=True).returncode == 0, 30, "payapp serve")

    def sql(q: str) -> list[list[str]]:
        return [line.split("\t") for line in mariadb.sql(q, db="bench").splitlines()]

    mark: dict[str, str] = {}  # where the step started: its backlog counts only rows since (see backlog)

    def backlog() -> int:
        """Unpublished outbox rows + API events not applied yet. Within a step (started with nothing left) only
        its own rows are counted, by primary key and processed_at ranges: counting every row ever written, once a
        second, made MariaDB scan the whole outbox and processed_event each time, a cost that grew with every
        step and was charged to the pipeline."""
        if args.api_only:
            return 0
        unpublished = int(sql("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL")[0][0])
        if mark:
            api_events = int(sql(f"SELECT COUNT(*) FROM outbox_event WHERE id > {mark['id']}"
                                 " AND topic <> 'payment.settled'")[0][0])
            applied = int(sql(f"SELECT COUNT(*) FROM processed_event WHERE processed_at >= '{mark['at']}'")[0][0])
        else:
            api_events = int(sql("SELECT COUNT(*) FROM outbox_event WHERE topic <> 'payment.settled'")[0][0])
            applied = int(sql("SELECT COUNT(*) FROM processed_event")[0][0])
        return unpublished + (api_events - applied)

    counters = ("Innodb_row_lock_waits", "Innodb_row_lock_time", "Questions", "Com_select", "Com_insert",
                "Com_update", "Com_commit", "Handler_read_next", "Handler_read_rnd_next", "Innodb_data_fsyncs",
                "Binlog_commits")

    def status() -> dict[str, int]:
        names = ", ".join(f"'{c}'" for c in counters)
        got = {r[0]: int(r[1]) for r in sql(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})")}
        return {c: got.get(c, 0) for c in counters}

    results: list[dict[str, Any]] = []

    def step(rate: int, variant: str) -> None:
        mark.clear()
        wait_until(lambda: backlog() == 0, 120, "the previous step to drain")
        t_start = sql("SELECT UTC_TIMESTAMP(6)")[0][0]
        mark.update(id=sql("SELECT COALESCE(MAX(id), 0) FROM outbox_event")[0][0], at=t_start)
        cpu0 = {n: sum(cpu_seconds(p) for p in tree(pr.pid)) for n, pr in procs.items()}
        cpu0["mariadbd"] = cpu_seconds(mariadb.proc.pid) if mariadb.proc else 0
        cpu0["kafka"] = sum(cpu_seconds(p) for p in kafka.pids())
        st0 = status()
        load0 = os.getloadavg()[0]
        summary = base / f"k6-{rate}-{variant}.json"
        k6 = subprocess.Popen(
            [str(VENV / "k6"), "run", "--quiet", "--summary-export", str(summary), str(script)],
            env=env | {"BASE_URL": f"http://127.0.0.1:{port}", "RATE": str(rate),
                       "DURATION": f"{args.duration}s", "RUN": f"r{rate}-{variant}-{int(time.time())}"},
            stdout=subprocess.DEVNULL, stderr=open(base / f"k6-{rate}-{variant}.log", "wb"))  # noqa: SIM115
        # (a file, not a pipe: k6 warns per failed request and would block on a full pipe)
        peak = 0
        k6_cpu = 0.0  # sampled while it runs (the last sample misses at most its final second)
        while k6.poll() is None:
            peak = max(peak, backlog())
            k6_cpu = max(k6_cpu, cpu_seconds(k6.pid))
            time.sleep(1)
        left = backlog()
        m = json.loads(summary.read_text())["metrics"] if summary.exists() else {}
        if "http_req_duration" not in m:
            print(f"rate {rate:5d}/s  k6 measured no request (exit {k6.returncode}): "
                  f"{(base / f'k6-{rate}-{variant}.log').read_text(errors='replace')[-300:]}", flush=True)
            return
        dur = m["http_req_duration"]
        iterations = m["iterations"]["count"]
        failed = m.get("http_req_failed", {}).get("passes", 0)
        checks_failed = m.get("checks", {}).get("fails", 0)
        dropped = m.get("dropped_iterations", {}).get("count", 0)
        drained = True
        try:
            wait_until(lambda: backlog() == 0, 120, "drain")
        except TimeoutError:
            drained = False
        # CPU and counters up to the drain: the pipeline's work for this step's payments, not only what fit in it.
        st1 = status()
        cpu1 = {n: sum(cpu_seconds(p) for p in tree(pr.pid)) for n, pr in procs.items()}
        cpu1["mariadbd"] = cpu_seconds(mariadb.proc.pid) if mariadb.proc else 0
        cpu1["kafka"] = sum(cpu_seconds(p) for p in kafka.pids())
        e2e = [] if args.api_only else sql(
            "SELECT TIMESTAMPDIFF(MICROSECOND, o.created_at, s.settled_at) / 1000 FROM settlement s"
            " JOIN payment_operation o ON o.operation_id = s.operation_id"
            f" WHERE s.kind = 'CAPTURE' AND o.created_at >= '{t_start}' ORDER BY 1")
        lat = [float(r[0]) for r in e2e]

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

        delta = {c: st1[c] - st0[c] for c in counters}
        n = max(iterations, 1)
        results.append({
            "variant": variant, "rate": rate, "achieved": iterations / args.duration, "p50": dur["p(50)"],
            "p95": dur["p(95)"], "p99": dur["p(99)"], "errors": failed + checks_failed, "dropped": dropped,
            "peak_backlog": peak, "left": left, "drained": drained, "e2e_p50": pct(lat, 0.5),
            "e2e_p95": pct(lat, 0.95), "settled": len(lat),
            "cpu": {k: round(cpu1[k] - cpu0.get(k, 0), 1) for k in cpu1}, "load": load0,
        })
        r = results[-1]
        r["cpu"]["k6"] = round(k6_cpu, 1)
        per = {k: round(1000 * (cpu1[k] - cpu0.get(k, 0)) / n, 2) for k in cpu1}
        tag = f"[{variant}] " if args.compare else ""
        print(f"{tag}rate {rate:5d}/s  achieved {r['achieved']:7.1f}/s  http p50 {r['p50']:6.1f} p95 {r['p95']:6.1f}"
              f" p99 {r['p99']:6.1f} ms  errors {r['errors']}  dropped {r['dropped']}  backlog peak {peak}"
              f" left {left}  capture->settled p50 {r['e2e_p50']:.0f} p95 {r['e2e_p95']:.0f} ms"
              f" ({r['settled']} settled)", flush=True)
        print(f"        CPU seconds until drained ({args.duration}s of load, 2 cores = {2 * args.duration}s):"
              f" {r['cpu']}; machine load average at start {r['load']:.1f}", flush=True)
        print(f"        CPU ms per payment: {per} (all {sum(per.values()):.2f});"
              f" MariaDB per payment: " + ", ".join(f"{c} {delta[c] / n:.1f}" for c in counters[2:])
              + f"; InnoDB row-lock waits {delta['Innodb_row_lock_waits']}"
              f" ({delta['Innodb_row_lock_time']} ms)", flush=True)
    try:
        subprocess.run([str(VENV / "payapp"), "migrate"], env=env, check=True, capture_output=True)
        script = base / "flow.js"
        script.write_text(K6_SCRIPT)
        running = ""
        for rate in rates:
            for variant in variants:
                if variant != running:
                    if running:
                        mark.clear()
                        wait_until(lambda: backlog() == 0, 120, "the previous step to drain")
                    run_variant(variant)
                    running = variant
                step(rate, variant)
        for variant in variants:
            ok = [r for r in results if r["variant"] == variant and r["p95"] <= 25 and r["errors"] == 0
                  and r["dropped"] == 0 and r["left"] <= r["rate"] and r["drained"]]
            best = max(ok, key=lambda r: r["achieved"]) if ok else None
            label = (f" [{variant}: {args.compare if variant == 'base' else (args.new or 'work tree')}]"
                     if args.compare else "")
            print(f"highest full-flow rate with HTTP p95 <= 25 ms, 0 errors, bounded backlog{label}: "
                  + (f"{best['achieved']:.0f} payments/s (step {best['rate']}/s), capture->settled p95 "
                     f"{best['e2e_p95']:.0f} ms" if best else "none of the steps"))
        rec = subprocess.run([str(VENV / "payapp"), "reconcile"], env=env, capture_output=True, text=True)
        print(f"reconcile after the run (exit {rec.returncode}): {rec.stdout.strip()}")
    finally:
        stop_all()
        if args.profile:
            import pstats

            for label, prof in profiles:
                if prof.exists():
                    print(f"--- {label}: top functions by own CPU time (cProfile, process_time)")
                    pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)
                    print(f"--- {label}: by cumulative CPU time")
                    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(r"payapp|aiokafka.*(send|getmany)", 15)
        kafka.stop()
        redis.stop()
        mariadb.stop()
        if args.keep:
            print(f"logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
