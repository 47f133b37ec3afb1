"""``payctl upgrade`` and ``payctl rollback``: a new payapp release, or the previous one, node by node under traffic.

Upgrade, per node in ``node_order`` (nodes that are neither the LB nor the MariaDB primary first: the node whose
trouble costs most goes last)::

    stage     ship the wheelhouse, install the new release next to the current one (the node still serves)
    migrate   first node only: ``payapp migrate`` from the new release. Migrations must be backward compatible
              (expand now, contract in a later release): the old release keeps running against the new schema
    lb out    nginx on the LB node: this node's upstream marked ``down``, ``nginx -t``, SIGHUP; wait until the old
              nginx workers have finished their requests and exited
    drain     stop the node's app programs: SIGTERM, payapp stops accepting and finishes in-flight requests
    switch    ``current`` -> the new release (one rename), start the programs
    health    every program RUNNING and the app's /health directly (``deploy.check_health``), within a deadline
    lb in     the LB's previous nginx.conf back (byte for byte: a later phase apply sees no drift), SIGHUP
    prune     keep ``current`` and ``releases.KEEP_PREVIOUS`` older releases

An unhealthy node is switched back to its previous release, restarted, checked, and put back into the LB; the failed
release is deleted; the upgrade stops there with an ``UpgradeError`` (nodes after it are not touched). With a single
app node there is no peer to carry traffic: it is drained and restarted in place and the downtime (SIGTERM to
healthy) is measured and reported. ``rollback`` is the same dance without stage and migrate, to the previous release
on each node (``releases.previous``); the release it leaves is deleted.

Around it: the deploy lock on the first node that answers, one audit line (locally and on every node), hooks for
progress and the confirmation. The core never prints.
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from payctl import audit, components, deploy, hosts, lock, releases, rolling, runtimes
from payctl.errors import ConfigError, DeployError, PayctlError
from payctl.gate import deployed_phase
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, Plan, make_plan
from payctl.render import is_lab
from payctl.secrets import load_or_create, secrets_path
from payctl.wheelhouse import Wheelhouse, app_source, build, payapp_version

Kind = Literal["upgrade", "rollback"]
_CHECKOUT = Path(__file__).resolve().parents[2]


class UpgradeError(DeployError):
    """The upgrade or rollback stopped; the message says which node and what state every node is left in."""


class UpgradeRefused(PayctlError):
    """Nothing can be planned (no release to roll back to, compose runtime, nothing deployed): nothing changed."""

    exit_code = 2


@dataclass(frozen=True)
class NodeStep:
    node: str
    address: str
    prefix: str
    programs: tuple[str, ...]
    current: str  # the release running now
    target: str  # the release it runs afterwards
    in_lb: bool  # taken out of the LB and put back (deployments with more than one app node)
    migrate: bool
    has_app: bool


@dataclass(frozen=True)
class UpgradePlan:
    kind: Kind
    deployment: str
    phase: int
    lab: bool
    lb: str | None
    lb_prefix: str
    primary: str  # the MariaDB primary: where the "migrated" marker of the apply engine lives
    primary_prefix: str
    nodes: tuple[NodeStep, ...]
    in_place: bool
    source: str = ""
    wheelhouse_key: str = ""
    version: str = ""
    notes: tuple[str, ...] = ()


class Hooks(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress."""

    def confirm(self, plan: UpgradePlan) -> bool:
        """Asked once, after the plan is shown, before anything changes; False aborts."""


@dataclass(frozen=True)
class UpgradeRequest:
    inventory: Inventory
    inventory_path: Path
    home: Path
    command: str
    kind: Kind = "upgrade"
    version: str | None = None  # a git ref of the checkout; None: the payapp tree of app_source()
    dry_run: bool = False
    health_timeout_s: float = 60.0
    lb_drain_timeout_s: float = 30.0


@dataclass
class NodeOutcome:
    node: str
    before: str
    after: str
    stage_s: float = 0.0  # wheelhouse shipped and release installed (the node still serving)
    drain_s: float = 0.0
    healthy_s: float = 0.0  # switch + start until healthy
    out_of_lb_s: float | None = None
    downtime_s: float | None = None  # in place only: SIGTERM to healthy
    notes: list[str] = field(default_factory=list)


@dataclass
class UpgradeResult:
    plan: UpgradePlan
    applied: bool
    nodes: list[NodeOutcome] = field(default_factory=list)
    duration_s: float = 0.0
    audit_path: Path | None = None


# ------------------------------------------------------------------------------------------------------ planning


def app_nodes(plan: Plan) -> list[str]:
    """Active nodes that run a payapp program (they hold releases)."""
    return [n.name for n in plan.active_nodes if n.app is not None or n.relay is not None or n.consumer is not None]


def node_order(plan: Plan) -> tuple[str, ...]:
    """Upgrade order: nodes that are neither the LB nor the MariaDB primary first, inventory order otherwise."""
    topo = plan.topology
    names = app_nodes(plan)
    return tuple(sorted(names, key=lambda n: (n in (topo.lb, topo.mariadb_primary), names.index(n))))


def _programs(plan: Plan, node: str) -> tuple[str, ...]:
    return components.app_programs_of(plan.node(node))


def make_upgrade_plan(kind: Kind, plan: Plan, facts: Mapping[str, runtimes.NodeFacts], *, phase: int,
                      key: str = "", source: str = "", version: str = "") -> UpgradePlan:  # fmt: skip
    """The node steps: for an upgrade a new release named from ``key`` on every node, for a rollback each node's
    previous release. Raises UpgradeRefused when a node lacks what the step needs (pure: nothing is contacted)."""
    topo = plan.topology
    order = node_order(plan)
    if not order:
        raise UpgradeRefused(f"phase {phase} of '{plan.deployment}' runs no payapp program: nothing to {kind}")
    in_lb = len(topo.lb_upstreams) > 1
    steps: list[NodeStep] = []
    notes: list[str] = []
    for i, name in enumerate(order):
        f = facts.get(name, runtimes.NodeFacts())
        n = plan.node(name)
        if not f.release_current and f.python:  # reachable (facts read) but not on the release layout
            raise UpgradeRefused(f"{name} has no payapp release (no {n.prefix}/current)",
                                 hint=f"run `payctl phase{phase} apply` first: it sets up the releases")  # fmt: skip
        if kind == "upgrade":
            target = releases.next_name(f.releases, key)
        else:
            prev = releases.previous(f.releases, f.release_current) if f.release_current else "?"
            if prev is None:
                raise UpgradeRefused(f"{name} keeps no release older than {f.release_current}: nothing to roll back to",
                                     hint="a release is kept for rollback by each upgrade or apply that replaces "
                                     f"it (see {n.prefix}/releases)")  # fmt: skip
            target = prev
        steps.append(NodeStep(name, n.private_address, n.prefix, _programs(plan, name), f.release_current or "?",
                              target, in_lb and name in topo.lb_upstreams, kind == "upgrade" and i == 0,
                              n.app is not None))  # fmt: skip
    if not in_lb:
        notes.append("one app node: no peer carries traffic while it restarts; it is drained and restarted in place "
                     "(requests during the restart fail; the downtime is measured)")  # fmt: skip
    if kind == "upgrade":
        notes.append("migrations run once, from the new release, before the first node switches: they must be "
                     "backward compatible (expand now, contract in a later release)")  # fmt: skip
    else:
        notes.append("the schema stays as it is (migrations are expand-only, so the older release runs on it)")
    lb = topo.lb or None
    return UpgradePlan(kind, plan.deployment, phase, is_lab(plan), lb, plan.node(lb).prefix if lb else "",
                       topo.mariadb_primary, plan.node(topo.mariadb_primary).prefix, tuple(steps), not in_lb,
                       source, key, version, tuple(notes))  # fmt: skip


def describe(up: UpgradePlan) -> list[str]:
    """The plan as lines (the CLI prints them before asking and for --dry-run)."""
    what = f"upgrade to payapp {up.version} (wheelhouse {up.wheelhouse_key}, from {up.source})" \
        if up.kind == "upgrade" else "roll back to the previous release on every node"  # fmt: skip
    lines = [f"{what}: deployment {up.deployment}, phase {up.phase}, node order {', '.join(s.node for s in up.nodes)}"]
    for i, s in enumerate(up.nodes, 1):
        steps = []
        if up.kind == "upgrade":
            steps.append(f"install releases/{s.target}")
        if s.migrate:
            steps.append("payapp migrate (once)")
        if s.in_lb:
            steps.append(f"out of the LB ({up.lb}: upstream {s.address}:{PORTS['app']} down, nginx reload)")
        steps.append(f"drain and stop {', '.join(s.programs)}")
        steps.append(f"current {s.current} -> {s.target}")
        steps.append("start, health check" + (", back into the LB" if s.in_lb else ""))
        lines.append(f"  {i}. [{s.node}] " + "; ".join(steps))
    lines.append("  on an unhealthy node: that node back to its previous release (and into the LB), stop there")
    lines += [f"  note: {n}" for n in up.notes]
    return lines


# ------------------------------------------------------------------------------------------------------ sources


@contextmanager
def payapp_tree(version: str | None) -> Iterator[tuple[Path, str]]:
    """The payapp tree to build: ``app_source()`` (the checkout, or $PAYCTL_APP_SOURCE) or, for a version, ``app/``
    of that git ref of the checkout, exported to a temporary directory."""
    if version is None:
        src = app_source()
        yield src, str(src)
        return
    rev = subprocess.run(["git", "-C", str(_CHECKOUT), "rev-parse", "--verify", "--quiet", f"{version}^{{commit}}"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if rev.returncode != 0:
        raise ConfigError(f"--version {version}: no such tag, branch or commit in {_CHECKOUT}",
                          hint="pass a git ref of this checkout (git tag -l), or leave --version out")  # fmt: skip
    sha = rev.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="payctl-app-") as tmp:
        tar = Path(tmp) / "app.tar"
        out = subprocess.run(["git", "-C", str(_CHECKOUT), "archive", "--format=tar", "-o", str(tar), sha, "app"],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if out.returncode != 0:
            raise ConfigError(f"--version {version}: git archive failed: {out.stderr.strip()}")
        with tarfile.open(tar) as t:
            t.extractall(tmp, filter="data")
        yield Path(tmp) / "app", f"git {version} ({sha[:12]})"


# ------------------------------------------------------------------------------------------------------ node steps


def _ship_wheelhouse(n: rolling.NodeShell, facts: runtimes.NodeFacts, house: Wheelhouse, bundles: Path) -> None:
    if facts.bundles.get("wheelhouse") == runtimes.sha256_text(house.manifest):
        return
    tar = runtimes.bundle_tar(list(house.wheels), house.manifest, bundles)
    upload = runtimes.bundle_upload_path(n.prefix, "wheelhouse")
    n.put(tar, upload)
    n.run(runtimes.unpack_command(upload, f"{n.prefix}/wheelhouse"), "unpacking the wheelhouse")


class _Quiet:
    """deploy.check_health wants hooks; progress goes to ours."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    def step(self, node: str | None, step: str) -> None:
        self.hooks.step(node, step)

    def confirm(self, preview: deploy.Preview) -> bool:  # pragma: no cover - never asked
        return True


def _healthy(conn: hosts.Connected, plan: Plan, hooks: Hooks, node: str, timeout: float) -> tuple[bool, str]:
    return deploy.healthy(conn, plan, _Quiet(hooks), node, timeout)


def _roll_node(conn: hosts.Connected, up: UpgradePlan, plan: Plan, s: NodeStep, facts: runtimes.NodeFacts,
               req: UpgradeRequest, house: Wheelhouse | None, hooks: Hooks) -> NodeOutcome:  # fmt: skip
    """One node from ``s.current`` to ``s.target``; on an unhealthy result back to ``s.current`` and UpgradeError."""
    n = rolling.NodeShell(conn, s.node, s.prefix, up.lab)
    out = NodeOutcome(s.node, s.current, s.current)
    target_dir = releases.release_dir(s.prefix, s.target)
    staged_at = time.monotonic()
    if house is not None:
        hooks.step(s.node, "ship the wheelhouse")
        _ship_wheelhouse(n, facts, house, req.home / "bundles")
        hooks.step(s.node, f"install release {s.target} (the node still serves)")
        n.run(releases.install_command(s.prefix, s.target, f"{s.prefix}/wheelhouse"), f"installing {s.target}")
        out.stage_s = round(time.monotonic() - staged_at, 2)
    if s.migrate:
        hooks.step(s.node, "payapp migrate (once, from the new release)")
        try:
            n.run(f"{shlex.quote(target_dir)}/bin/payapp migrate --env-file {shlex.quote(s.prefix + '/app.env')}",
                  "payapp migrate")  # fmt: skip
        except DeployError as exc:
            n.shell(f"rm -rf {shlex.quote(target_dir)}")
            raise UpgradeError(f"{exc.message}; nothing was switched, every node still runs its release",
                               hint="fix the migration; it must work against the running schema") from exc  # fmt: skip
    lb = rolling.NodeShell(conn, up.lb, up.lb_prefix, up.lab) if s.in_lb and up.lb else None
    out_at = 0.0
    if lb is not None:
        hooks.step(up.lb, f"take {s.node} out of the load balancer (graceful reload)")
        note = rolling.take_out(lb, f"{s.address}:{PORTS['app']}", req.lb_drain_timeout_s)
        out_at = time.monotonic()
        if note:
            out.notes.append(note)
    hooks.step(s.node, f"drain: stop {', '.join(s.programs)} (SIGTERM, in-flight requests finish)")
    stopped_at = time.monotonic()
    n.programs("stop", s.programs)
    out.drain_s = round(time.monotonic() - stopped_at, 2)
    hooks.step(s.node, f"current -> {s.target}, start")
    switched_at = time.monotonic()
    n.run(releases.switch_command(s.prefix, s.target), "switching current")
    n.programs("start", s.programs)
    ok, detail = _healthy(conn, plan, hooks, s.node, req.health_timeout_s)
    if not ok:
        hooks.step(s.node, f"unhealthy: back to {s.current}")
        n.programs("stop", s.programs)
        n.run(releases.switch_command(s.prefix, s.current), "switching current back")
        n.programs("start", s.programs)
        back, detail2 = _healthy(conn, plan, hooks, s.node, req.health_timeout_s)
        if back and lb is not None:
            rolling.put_back(lb, req.lb_drain_timeout_s)
        if up.kind == "upgrade":
            n.shell(f"rm -rf {shlex.quote(target_dir)}")
        where = "" if lb is None else (" and is back in the load balancer" if back else
                                        " but is still unhealthy, so it stays OUT of the load balancer")  # fmt: skip
        state = f"{s.node} runs {s.current} again{where}" + ("" if back else f" ({detail2})")
        raise UpgradeError(f"{up.kind} stopped at {s.node}: {s.target} was not healthy within "
                           f"{req.health_timeout_s:.0f}s ({detail}); {state}",
                           hint=f"see `payctl logs -i INV --node {s.node} --component app`; nodes after "
                           f"{s.node} were not touched")  # fmt: skip
    out.healthy_s = round(time.monotonic() - switched_at, 2)
    if up.in_place:
        out.downtime_s = round(time.monotonic() - stopped_at, 2)
    if lb is not None:
        hooks.step(up.lb, f"put {s.node} back into the load balancer")
        note = rolling.put_back(lb, req.lb_drain_timeout_s)
        out.out_of_lb_s = round(time.monotonic() - out_at, 2)
        if note:
            out.notes.append(note)
    existing = [*facts.releases, s.target] if up.kind == "upgrade" else [r for r in facts.releases if r != s.current]
    n.run(releases.prune_command(s.prefix, releases.keep(existing, s.target)), "pruning old releases")
    out.after = s.target
    return out


def run(req: UpgradeRequest, hooks: Hooks) -> UpgradeResult:
    """Plan, confirm, then roll node by node under the deploy lock; audited. Dry runs return the plan only."""
    started = time.monotonic()
    inv = req.inventory
    if inv.runtime != "native":
        raise UpgradeRefused(f"payctl {req.kind} handles the native runtime; '{inv.deployment}' runs {inv.runtime}",
                             hint="with compose, re-apply the phase: compose recreates the app from the new image")
    phase = deployed_phase(inv.deployment, req.home)
    if phase is None:
        raise UpgradeRefused(f"no phase of '{inv.deployment}' is recorded as applied in {req.home}",
                             hint="run `payctl phaseN apply` first (payctl reads the deployed phase from its audit "
                             "log; set PAYCTL_HOME to where the deployment's state lives)")  # fmt: skip
    redact = (load_or_create(req.home, inv.deployment, allow_create=False).redact
              if secrets_path(req.home, inv.deployment).is_file() else (lambda t: t))  # fmt: skip
    fake = req.dry_run and not hosts.is_lab(inv)
    prefixes = {n.name: inv.node_prefix(n.name) for n in inv.nodes}
    addresses = {n.name: n.private_address for n in inv.nodes}
    hooks.step(None, "connect, facts")
    with hosts.connect(inv, req.home, fake=fake, redact=redact) as conn:
        facts = deploy.gather_facts(conn, prefixes, addresses)
        plan = make_plan(inv, load_phase(phase), live_roles=deploy.live_roles(facts))
        house: Wheelhouse | None = None
        if req.kind == "upgrade":
            python = next((f.python for f in facts.values() if f.python), None)
            with payapp_tree(req.version) as (tree, source):
                hooks.step(None, f"wheelhouse (pip wheel {source}, cached by content hash)")
                house = build(req.home / "wheelhouse", python, tree)
            up = make_upgrade_plan("upgrade", plan, facts, phase=phase, key=house.key, source=source,
                                   version=payapp_version(house))  # fmt: skip
        else:
            up = make_upgrade_plan("rollback", plan, facts, phase=phase)
        result = UpgradeResult(up, applied=False)
        if req.dry_run:
            return result
        if req.kind == "upgrade" and not up.in_place:
            for s in up.nodes:  # each node leaves the LB in turn: the others must carry the traffic meanwhile
                hooks.step(s.node, "health before the upgrade")
                ok, detail = _healthy(conn, plan, hooks, s.node, 10.0)
                if not ok:
                    raise UpgradeRefused(f"{s.node} is not healthy now ({detail}): a rolling upgrade needs every "
                                         "node healthy", hint="payctl status; fix it, or use payctl rollback")
        if not hooks.confirm(up):
            return result
        with hosts.node_shells(inv, req.home, conn=conn) as open_shell:  # connected to every node: no own connection
            held = lock.take(deploy.lock_nodes(inv), open_shell, lock.new_info(inv.deployment, req.command))
        error: PayctlError | None = None
        try:
            for s in up.nodes:
                result.nodes.append(_roll_node(conn, up, plan, s, facts[s.node], req, house, hooks))
            result.applied = True
            return result
        except PayctlError as exc:
            error = exc
            raise
        except KeyboardInterrupt:
            error = DeployError(f"interrupted (SIGINT) during the {req.kind}")
            raise
        finally:
            _record_migrated(conn, up)
            _audit(req, conn, up, result, error, prefixes, started)
            lock.give_back(held)


def _record_migrated(conn: hosts.Connected, up: UpgradePlan) -> None:
    """The apply engine's record of migrations (``payctl/migrated`` on the primary: the build whose migrations ran):
    the primary's current release now. True after an upgrade (its migrations ran first) and after a rollback
    (expand-only migrations: the schema is a superset of what the older release needs), so a later phase apply of
    the same build migrates nothing and restarts nothing."""
    if up.primary not in conn.hosts or not any(s.node == up.primary for s in up.nodes):
        return
    p = shlex.quote(up.primary_prefix)
    manifest = f"{p}/{releases.CURRENT}/{releases.RELEASE_MANIFEST}"
    deploy.shell_of(conn.host(up.primary))(
        f"[ -f {manifest} ] && sha256sum < {manifest} | cut -c1-64 > {p}/payctl/migrated.new && "
        f"mv {p}/payctl/migrated.new {p}/payctl/migrated"
    )


def _audit(req: UpgradeRequest, conn: hosts.Connected, up: UpgradePlan, result: UpgradeResult,
           error: PayctlError | None, prefixes: Mapping[str, str], started: float) -> None:  # fmt: skip
    record = audit.AuditRecord(
        deployment=up.deployment, command=req.command, phase=up.phase, inventory=str(req.inventory_path),
        inventory_sha256=audit.inventory_hash(req.inventory_path) if req.inventory_path.is_file() else "",
        nodes=tuple(s.node for s in up.nodes), result="failed" if error else "ok",
        changed_files=tuple(f"{o.node}/current: {o.before} -> {o.after}" for o in result.nodes),
        restarted=tuple(f"{s.node}/{p}" for s in up.nodes[: len(result.nodes) + bool(error)] for p in s.programs),
        error=error.message if error else "", duration_s=round(time.monotonic() - started, 2),
    )  # fmt: skip
    result.audit_path = audit.append_local(req.home, record, conn.redact)
    result.duration_s = record.duration_s
    line = record.line(conn.redact)
    for node, host in conn.hosts.items():
        deploy.shell_of(host)(audit.append_command(prefixes[node], line))
