"""Fault drills on a lab deployment: constant payment load, one fault, recovery, then an audit of every payment.

    plan = plan_drill(inv, spec)                   # refuses anything but a lab deployment our code made
    result = run_drill(plan, report_dir)           # k6 load, the fault after the warm-up, recovery, audit
    write_results([result], report_dir)            # results.json + results.md (the table of docs/reliability.md)
    result.passed                                  # nothing lost or duplicated, recovered within the bound

The load is ``loadtest/drill.js`` through the deployment's nginx (k6 as a subprocess); its log records every request
and every acknowledged operation (``payctl.drillaudit``). Faults act on the lab hosts directly, since lab hosts are
namespaces on this machine: programs through the node's supervisord (``ip netns exec NS supervisorctl``), processes
by the pids supervisord gives (never by name), links by the lab's own veth names (``payctl.lab.layout``). Nothing
here targets anything but 10.77.0.0/24 lab hosts and loopback. Nothing here prints; ``on_step`` gets progress lines.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from payctl import audit, lab, lock
from payctl.drillaudit import Audit, DbFacts, Timeline, facts_argv, judge, parse_log, timeline
from payctl.drilldb import DbFailover, primary_address, promote, reattach
from payctl.drilldisk import disk_full
from payctl.drillfaults import Fault, Node, inject, snapshot, supervisorctl
from payctl.errors import ConfigError, PayctlError, TargetUnreachable
from payctl.gate import Target, check_target, k6_duration, lb_url
from payctl.hosts import is_lab
from payctl.inventory import Inventory
from payctl.loadrun import find_k6, free_port
from payctl.serverchecks import CommandResult, CommandRunner, ReconciliationBalanced, local_runner

Action = Literal["kill-worker", "kill", "restart-all", "partition", "failover", "disk-full"]


@dataclass(frozen=True)
class ScenarioDef:
    name: str
    summary: str
    action: Action
    program: str = ""  # the supervisor program acted on ("" = the whole node)
    duration_s: float = 30.0  # the CLI's defaults for this scenario
    recover_bound_s: float = 60.0


SCENARIOS: dict[str, ScenarioDef] = {
    s.name: s
    for s in (
        ScenarioDef("kill-app", "kill -9 one payapp worker (its master starts a new one)", "kill-worker", "payctl-app"),
        ScenarioDef("kill-app-all", "kill -9 the payapp master and all its workers on the node", "kill", "payctl-app"),
        ScenarioDef("kill-relay", "kill -9 the outbox relay", "kill", "payctl-relay"),
        ScenarioDef("kill-consumer", "kill -9 the settlement consumer", "kill", "payctl-consumer"),
        ScenarioDef("kill-broker", "kill -9 the Kafka broker (supervisord restarts it)", "kill", "payctl-kafka"),
        ScenarioDef("kill-redis", "kill -9 Redis (the rate limiter falls back, then recovers)", "kill", "payctl-redis"),
        ScenarioDef("restart-node", "restart every program of the node through its supervisord", "restart-all"),
        ScenarioDef("partition", "cut the node's veth for --fault-duration seconds", "partition"),
        ScenarioDef(
            "kill-db-primary",
            "kill -9 the MariaDB primary, keep it down, promote the replica (failover db --force), then re-attach "
            "the old primary as a replica",
            "failover",
            "payctl-mariadb",
        ),
        ScenarioDef(
            "disk-full",
            "MariaDB's binlog onto a 256 KiB tmpfs that the load fills; kept full --fault-duration seconds, then grown "
            "(MariaDB retries every 60 s); binlog back on the real disk, tmpfs unmounted",
            "disk-full",
            "payctl-mariadb",
            duration_s=100.0,
            recover_bound_s=100.0,
        ),
    )
}
NOT_BUILT: dict[str, str] = {}
# disk-full: after the tmpfs is grown MariaDB may wait up to 60 s more before it writes (its retry interval).
DISK_FULL_AFTER_S = 70.0


def built() -> list[str]:
    """The scenarios a drill can run now."""
    return [n for n in SCENARIOS if n not in NOT_BUILT]


@dataclass(frozen=True)
class DrillSpec:
    scenario: str
    rps: int = 15
    duration_s: float = 30.0
    warmup_s: float = 8.0  # load before the fault
    fault_s: float = 8.0  # partition only: how long the link stays down
    recover_bound_s: float = 60.0  # the fault's start to recovered, at most
    drain_bound_s: float = 90.0  # after the load: events published, applied, settled
    node: str | None = None

    def __post_init__(self) -> None:
        if self.scenario in NOT_BUILT:
            raise ConfigError(f"drill {self.scenario}: {NOT_BUILT[self.scenario]}", hint=f"one of {', '.join(built())}")
        problems = []
        if self.scenario not in SCENARIOS:
            known = ", ".join(dict.fromkeys([*SCENARIOS, *NOT_BUILT]))
            problems.append(f"SCENARIO: unknown {self.scenario!r} (one of {known})")
        if self.rps <= 0:
            problems.append("--rps: must be > 0")
        if self.warmup_s <= 0 or self.duration_s <= self.warmup_s + 5:
            problems.append(f"--duration ({self.duration_s:g}s) must exceed the warm-up ({self.warmup_s:g}s) by 5s+")
        if self.fault_s <= 0 or self.recover_bound_s <= 0 or self.drain_bound_s <= 0:
            problems.append("--fault-duration and the bounds must be > 0")
        if self.scenario == "disk-full" and self.duration_s < self.warmup_s + self.fault_s + DISK_FULL_AFTER_S:
            problems.append(f"--duration: disk-full needs the warm-up + --fault-duration + {DISK_FULL_AFTER_S:g}s "
                            f"(MariaDB retries a full disk every 60 s), at least "
                            f"{self.warmup_s + self.fault_s + DISK_FULL_AFTER_S:g}s")  # fmt: skip
        if problems:
            raise ConfigError("invalid drill", hint="fix the options listed above", problems=problems)

    @property
    def definition(self) -> ScenarioDef:
        return SCENARIOS[self.scenario]


@dataclass(frozen=True)
class DrillPlan:
    deployment: str
    spec: DrillSpec
    target: Target
    nodes: tuple[Node, ...]
    fault_node: Node
    app_node: Node  # where the audit and reconciliation run (its venv and env file)
    db: DbFailover | None = None  # kill-db-primary: who is killed, who is promoted

    def describe(self) -> str:
        d = self.spec.definition
        what = f"{d.summary} on {self.fault_node.name}"
        if d.action == "partition":
            what = f"cut {self.fault_node.veth} ({self.fault_node.name}) for {self.spec.fault_s:g}s"
        if d.action == "disk-full":
            what = (f"MariaDB's binlog on {self.fault_node.name} onto a 256 KiB tmpfs, full for "
                    f"{self.spec.fault_s:g}s, then grown")  # fmt: skip
        return (
            f"drill {d.name} on '{self.deployment}': {self.spec.rps}/s payment flows through {self.target.url} for "
            f"{self.spec.duration_s:g}s; after {self.spec.warmup_s:g}s: {what}; then recovery (<= "
            f"{self.spec.recover_bound_s:g}s) and the audit"
        )


def plan_drill(
    inv: Inventory,
    spec: DrillSpec,
    runner: CommandRunner | None = None,
    *,
    home: Path | None = None,
    inventory_path: Path | None = None,
) -> DrillPlan:
    """Check that ``inv`` is a lab deployment on this machine and pick the nodes; contacts nothing but ``ip`` and the
    nodes' supervisord. ``home`` and ``inventory_path`` are what ``kill-db-primary``'s promotion needs."""
    if not is_lab(inv):
        raise ConfigError(
            f"refusing to drill '{inv.deployment}': drills only run on lab deployments (10.77.0.0/24 lab hosts)",
            hint="bring one up with `payctl lab up -i lab-1node` and `payctl phase4 apply -i lab-1node`",
        )
    layouts = lab.layout(inv)  # raises on anything outside the lab network
    run = runner or local_runner()
    listed = run(["ip", "netns", "list"], 10).stdout
    up = {line.split()[0] for line in listed.splitlines() if line.strip()}
    missing = [n.namespace for n in layouts if n.namespace not in up]
    if missing:
        raise ConfigError(f"the lab hosts of '{inv.deployment}' are not up: no namespace {', '.join(missing)}",
                          hint="payctl lab up -i INV, then deploy a phase")  # fmt: skip
    nodes = tuple(Node(n.node, n.namespace, str(n.prefix), n.veth, n.address) for n in layouts)
    by_name = {n.name: n for n in nodes}
    d = spec.definition
    if spec.node is not None and spec.node not in by_name:
        raise ConfigError(f"--node: no node {spec.node!r} in the inventory", hint=f"nodes: {', '.join(by_name)}")
    app = next((by_name[n.name] for n in inv.with_role("app") if n.name in by_name), None)
    if app is None:
        raise ConfigError("the inventory has no app node to audit from", hint="lab inventories have one")
    if spec.node is not None:
        fault = by_name[spec.node]
    elif d.action == "partition":
        lb = {n.name for n in inv.with_role("lb")}
        # Cut a node the LB does not live on when there is one; on one node that cuts the client side.
        fault = next((n for n in nodes if n.name not in lb), nodes[0])
    elif d.action == "failover":
        fault = app  # chosen below: the primary
    elif d.action == "disk-full":
        fault = _primary(nodes, app, run)
    else:
        fault = _node_running(nodes, d.program, run) if d.program else app
    db = None
    if d.action == "failover":
        db_nodes = [n.name for n in inv.nodes if "mariadb" in n.roles]
        if len(db_nodes) < 2 or home is None or inventory_path is None:
            raise ConfigError(
                f"drill kill-db-primary needs a MariaDB replica to promote ('{inv.deployment}' has "
                f"{len(db_nodes)} MariaDB node(s))",
                hint="a 2-node lab: lab-2node at phase 5",
            )
        try:
            primary = primary_address((Path(app.prefix) / "app.env").read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {app.prefix}/app.env: {exc.strerror}", hint="deploy first") from None
        old = next((n for n in nodes if n.address == primary and n.name in db_nodes), None)
        if old is None:
            raise ConfigError(f"the app writes to {primary}, which is no MariaDB node of the inventory",
                              hint="payctl status -i INV shows the roles")  # fmt: skip
        fault = by_name[spec.node] if spec.node is not None else old
        new = next(n for n in db_nodes if n != fault.name)
        db = DbFailover(inv, inventory_path, home, fault.name, new)
    target = check_target(lb_url(inv), inv)
    return DrillPlan(inv.deployment, spec, target, nodes, fault, app, db)


def _primary(nodes: Sequence[Node], app: Node, runner: CommandRunner) -> Node:
    """The MariaDB node the app writes to (its env file), else the first that runs MariaDB."""
    try:
        address = primary_address((Path(app.prefix) / "app.env").read_text())
    except (OSError, ConfigError):
        address = ""
    found = next((n for n in nodes if n.address == address), None)
    return found or _node_running(nodes, "payctl-mariadb", runner)


def _node_running(nodes: Sequence[Node], program: str, runner: CommandRunner) -> Node:
    for n in nodes:
        if program in snapshot(n, runner):
            return n
    raise ConfigError(
        f"no node of the deployment runs {program}",
        hint="the phase deployed may not have it yet (Kafka, relay and consumer come with phase 3)",
    )


# ------------------------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class DrillResult:
    scenario: str
    deployment: str
    rps: int
    duration_s: float
    fault: Fault
    timeline: Timeline
    services_recovered_after_s: float | None
    audit: Audit
    reconciliation: str  # "balanced" or what went wrong
    healthy_after: bool
    recover_bound_s: float
    problems: tuple[str, ...] = ()

    @property
    def recovered_after_s(self) -> float | None:
        api, svc = self.timeline.recovered_after_s, self.services_recovered_after_s
        return None if api is None or svc is None else max(api, svc)

    @property
    def passed(self) -> bool:
        return not self.problems

    def row(self) -> dict[str, object]:
        r = self.recovered_after_s
        return {
            "scenario": self.scenario,
            "rps": self.rps,
            "duration_s": self.duration_s,
            "sent": self.timeline.sent,
            "acknowledged": self.timeline.acknowledged,
            "failed_during_fault": self.timeline.failed_during,
            "error_rate_during_fault": round(self.timeline.error_rate_during, 4),
            "recovered_after_s": None if r is None else round(r, 1),
            "lost": self.audit.lost_total,
            "duplicates": self.audit.duplicates_total,
            "payments_audited": self.audit.payments,
            "reconciliation": self.reconciliation,
            "verdict": "pass" if self.passed else "FAIL",
            "statuses_during_fault": self.timeline.statuses_text,
        }

    def as_dict(self) -> dict[str, object]:
        return {
            **self.row(),
            "deployment": self.deployment,
            "fault": asdict(self.fault),
            "timeline": asdict(self.timeline),
            "services_recovered_after_s": self.services_recovered_after_s,
            "api_recovered_after_s": self.timeline.recovered_after_s,
            "audit": {
                "lost": self.audit.lost,
                "duplicates": self.audit.duplicates,
                "problems": list(self.audit.problems),
            },
            "healthy_after": self.healthy_after,
            "recover_bound_s": self.recover_bound_s,
            "problems": list(self.problems),
        }


def verdict_problems(tl: Timeline, services_s: float | None, audit: Audit, reconciliation: str, healthy: bool,
                     bound_s: float) -> tuple[str, ...]:  # fmt: skip
    """Why a drill failed (empty: it passed)."""
    out = list(audit.problems)
    if tl.failed_before:
        out.append(f"{tl.failed_before} requests failed before the fault: the deployment was not healthy")
    if tl.recovered_after_s is None:
        out.append(f"the API did not serve {STABLE_WINDOW} of clean traffic after the fault before the load ended")
    if services_s is None:
        out.append(f"the faulted programs were not back (RUNNING, /health 200) within {bound_s:g}s")
    rec = None if tl.recovered_after_s is None or services_s is None else max(tl.recovered_after_s, services_s)
    if rec is not None and rec > bound_s:
        out.append(f"recovery took {rec:.1f}s, more than the bound of {bound_s:g}s")
    if reconciliation != "balanced":
        out.append(f"reconciliation: {reconciliation}")
    if not healthy:
        out.append("the deployment was not healthy after the drill (a program not RUNNING or /health not 200)")
    return tuple(out)


STABLE_WINDOW = "3s"

COLUMNS = (
    ("scenario", "scenario"), ("rps", "rate /s"), ("duration_s", "duration s"), ("sent", "requests sent"),
    ("acknowledged", "acknowledged"), ("failed_during_fault", "failed during fault"),
    ("error_rate_during_fault", "error rate during fault"), ("recovered_after_s", "recovered after s"),
    ("lost", "lost"), ("duplicates", "duplicates"), ("reconciliation", "reconciliation"), ("verdict", "verdict"),
    ("statuses_during_fault", "status codes during fault"),
)  # fmt: skip


def markdown_table(results: Sequence[DrillResult]) -> str:
    """The results table (docs/reliability.md shows the latest one)."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        row = r.row()
        cells = []
        for key, _ in COLUMNS:
            v = row[key]
            if key == "error_rate_during_fault" and isinstance(v, float):
                cells.append(f"{v:.1%}")
            else:
                cells.append("not recovered" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[DrillResult], directory: Path) -> Path:
    """``results.json`` (everything) and ``results.md`` (the table and each failure) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    md = [f"# Fault drills: {', '.join(r.scenario for r in results)}", "", markdown_table(results)]
    for r in results:
        for p in r.problems:
            md.append(f"- {r.scenario}: {p}")
    (directory / "results.md").write_text("\n".join(md).rstrip() + "\n")
    return directory


# ------------------------------------------------------------------------------------------------------ running


def _script() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "loadtest" / "drill.js", here.parents[1] / "loadtest" / "drill.js"):
        if candidate.is_file():
            return candidate
    raise TargetUnreachable("the k6 script loadtest/drill.js is missing", hint="reinstall payctl")


def _healthy(plan: DrillPlan, runner: CommandRunner, fault: Fault | None) -> bool:
    """Every program of every node RUNNING (the killed ones with a new pid) and /health 200 through nginx."""
    for n in plan.nodes:
        progs = snapshot(n, runner)
        if not progs or any(p.state != "RUNNING" for p in progs.values()):
            return False
        if fault is not None and n.name == fault.node:
            for name, old in fault.killed.items():
                if name in progs and progs[name].pid in old:
                    return False
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{plan.target.url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _netns_shell(ns: str) -> lock.Shell:
    def shell(cmd: str) -> tuple[bool, str, str]:
        p = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], capture_output=True, text=True,
                           timeout=30, check=False)  # fmt: skip
        return p.returncode == 0, p.stdout, p.stderr

    return shell


def run_drill(
    plan: DrillPlan,
    report_dir: Path,
    *,
    runner: CommandRunner | None = None,
    on_step: Callable[[str], None] = lambda _: None,
    command: str = "drill",
    audit_home: Path | None = None,
    inventory_path: Path | None = None,
    shell_for: Callable[[str], lock.Shell] | None = None,
) -> DrillResult:
    """Run the drill: load, fault, recovery, drain, audit. Holds the deploy lock on the first node meanwhile and,
    with ``audit_home``, writes an audit line (locally and on the first node) like an apply does. ``runner`` and
    ``shell_for`` (namespace -> shell for the lock and audit) are the seams to the lab hosts."""
    run = runner or local_runner()
    if not _healthy(plan, run, None):
        raise PayctlError(
            f"'{plan.deployment}' is not healthy before the drill (a program not RUNNING or "
            f"{plan.target.url}/health not 200)",
            hint="payctl status -i INV; fix it, then drill",
        )
    report_dir.mkdir(parents=True, exist_ok=True)
    namespaces = {n.name: n.namespace for n in plan.nodes}
    open_shell = shell_for or _netns_shell
    held = lock.take([(n.name, n.prefix) for n in plan.nodes], lambda node: open_shell(namespaces[node]),
                     lock.new_info(plan.deployment, command))  # fmt: skip
    shell = held.shell
    started = time.monotonic()
    error = "interrupted or crashed"
    try:
        result = _locked(plan, report_dir, run, on_step)
        error = "; ".join(result.problems)
        return result
    except PayctlError as exc:
        error = exc.message
        raise
    finally:
        try:
            if audit_home is not None:
                _audit(plan, command, error, time.monotonic() - started, audit_home, inventory_path, shell)
        finally:
            lock.give_back(held)


def _audit(plan: DrillPlan, command: str, error: str, duration_s: float, home: Path, inventory_path: Path | None,
           shell: lock.Shell) -> None:  # fmt: skip
    record = audit.AuditRecord(
        deployment=plan.deployment, command=command, phase=None, inventory=str(inventory_path or ""),
        inventory_sha256=audit.inventory_hash(inventory_path) if inventory_path and inventory_path.is_file() else "",
        nodes=tuple(n.name for n in plan.nodes), result="failed" if error else "ok", error=error,
        duration_s=round(duration_s, 2),
    )  # fmt: skip
    audit.append_local(home, record, lambda s: s)  # a drill handles no secret: nothing to redact
    shell(audit.append_command(plan.nodes[0].prefix, record.line(lambda s: s)))


def k6_invocation(url: str, rps: int, duration_s: float, merchant_prefix: str, log_path: Path,
                  ) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """The k6 command line and environment of the drill load (its log goes to ``log_path``)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}}
    env.update({"BASE_URL": url, "RATE": str(rps), "DURATION": k6_duration(duration_s), "RUN_ID": secrets.token_hex(4),
                "MERCHANT_PREFIX": merchant_prefix, "K6_NO_USAGE_REPORT": "true"})  # fmt: skip
    cmd = [find_k6(), "run", "--quiet", "--no-color", "--no-usage-report", "--address", f"127.0.0.1:{free_port()}",
           "--log-format=raw", f"--log-output=file={log_path}", str(_script())]  # fmt: skip
    return cmd, env


def _locked(plan: DrillPlan, report_dir: Path, run: CommandRunner, on_step: Callable[[str], None]) -> DrillResult:
    spec = plan.spec
    log_path = report_dir / "k6.log"
    prefix = f"d{secrets.token_hex(3)}m"  # this run's merchants: the audit selects exactly them
    cmd, env = k6_invocation(plan.target.url, spec.rps, spec.duration_s, prefix, log_path)
    on_step(f"load: {spec.rps}/s for {spec.duration_s:g}s (merchants {prefix}*)")
    with (report_dir / "k6.stderr").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
    t0 = time.time()
    fault: Fault | None = None
    services_at: float | None = None
    try:
        time.sleep(max(0.0, t0 + spec.warmup_s - time.time()))
        if proc.poll() is not None:
            raise TargetUnreachable(f"k6 stopped during the warm-up (exit {proc.returncode})",
                                    hint=f"see {report_dir / 'k6.stderr'}")  # fmt: skip
        on_step(f"fault: {spec.definition.summary} on {plan.fault_node.name}")
        db = plan.db
        action = spec.definition.action
        if action == "disk-full":
            fault = disk_full(plan.fault_node, run, spec.fault_s)
        else:
            fault = inject(action, spec.definition.program, plan.fault_node, run, spec.fault_s,
                           promote=(lambda: promote(db)) if db is not None else None)  # fmt: skip
        on_step(f"fault done ({fault.detail}); waiting for recovery")
        if db is not None:
            on_step(f"start {db.old}'s MariaDB again and re-attach it as a replica of {db.new}")
            run(supervisorctl(plan.fault_node, "start", spec.definition.program), 130)
            reattach(db)
        # Services: poll until every program is back, as long as the load runs (and the bound allows).
        while proc.poll() is None and time.time() - fault.start < spec.recover_bound_s:
            if _healthy(plan, run, fault):
                services_at = time.time()
                break
            time.sleep(0.5)
        rc = proc.wait(timeout=spec.duration_s + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if rc != 0:
        tail = (report_dir / "k6.stderr").read_text(errors="replace").strip().splitlines()[-3:]
        raise TargetUnreachable(f"k6 failed (exit {rc}): {' | '.join(tail) or 'no output'}",
                                hint=f"the k6 log is {log_path}")  # fmt: skip
    assert fault is not None
    on_step("load done; checking the deployment is healthy")
    # Programs still coming back when the load ended get the rest of the bound; the time is still recorded.
    deadline = max(fault.start + spec.recover_bound_s, time.time() + 10)
    healthy = _healthy(plan, run, fault)
    while not healthy and time.time() < deadline:
        time.sleep(0.5)
        healthy = _healthy(plan, run, fault)
    if services_at is None and healthy and time.time() - fault.start <= spec.recover_bound_s:
        services_at = time.time()
    log = parse_log(log_path.read_text(errors="replace").splitlines())
    tl = timeline(log.requests, fault.start, fault.end)
    on_step("draining: events published and applied, captures settled")
    facts = _drain(plan, run, prefix, spec.drain_bound_s)
    audit = judge(log, facts)
    recon = _reconcile(plan, run)
    svc = None if services_at is None else services_at - fault.start
    problems = verdict_problems(tl, svc, audit, recon, healthy, spec.recover_bound_s)
    return DrillResult(spec.scenario, plan.deployment, spec.rps, spec.duration_s, fault, tl, svc, audit, recon,
                       healthy, spec.recover_bound_s, problems)  # fmt: skip


def _payapp(node: Node) -> tuple[str, str]:
    """The node's payapp bin directory (``current/bin`` of payctl.releases, else the older ``venv/bin``) and env file;
    lab hosts share this machine's filesystem, so the check is local."""
    current = Path(node.prefix) / "current" / "bin"
    return str(current if current.is_dir() else Path(node.prefix) / "venv" / "bin"), f"{node.prefix}/app.env"


def facts_from(node: Node, runner: CommandRunner, merchant_prefix: str) -> DbFacts:
    """Run the audit's queries on ``node`` (its venv, its env file, inside its namespace)."""
    venv, env_file = _payapp(node)
    res = runner(["ip", "netns", "exec", node.namespace, *facts_argv(f"{venv}/python", env_file, merchant_prefix)], 60)
    if res.returncode != 0:
        raise PayctlError(f"the drill audit failed on {node.name}: {_tail(res)}",
                          hint="is the database up? payctl status -i INV")  # fmt: skip
    return DbFacts.from_json(res.stdout)


def _drain(plan: DrillPlan, runner: CommandRunner, prefix: str, bound_s: float) -> DbFacts:
    deadline = time.time() + bound_s
    while True:
        facts = facts_from(plan.app_node, runner, prefix)
        if facts.settled or time.time() > deadline:
            return facts
        time.sleep(2)


def _reconcile(plan: DrillPlan, runner: CommandRunner) -> str:
    venv, env_file = _payapp(plan.app_node)
    ns = plan.app_node.namespace

    def in_ns(argv: Sequence[str], timeout: float) -> CommandResult:
        return runner(["ip", "netns", "exec", ns, *argv], timeout)

    c = ReconciliationBalanced(in_ns, (f"{venv}/payapp", "--env-file", env_file), timeout_s=120)
    crit = c.run(120)
    return "balanced" if crit.passed else f"{crit.measured} {crit.detail}".strip()


def _tail(res: CommandResult) -> str:
    return " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:]) or f"exit {res.returncode}"


