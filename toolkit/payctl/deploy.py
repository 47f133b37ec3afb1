"""The deploy engine: ``payctl phaseN apply`` as connect → facts → lock → plan → render → preview → confirm → apply →
health → audit. The core never prints or prompts: the CLI passes ``Hooks`` (progress and confirmation).

    connect    pyinfra State over SSH (payctl.hosts; jump hosts; @fake for --dry-run of non-lab inventories)
    facts      one read-only script per node: datadir initialised? supervisord running? venv manifest? live roles
    lock       on the first node that answers (payctl.lock.take); a second apply fails with LockHeld naming the holder
    secrets    loaded, or created only when no node runs the deployment yet (else refusal with a hint)
    plan       payctl.plan.make_plan with the live roles (after a failover the hosts win over the inventory)
    render     payctl.render.render with the revealed secrets (only into 0600 files on the node)
    preview    pyinfra's own change detection on every file operation + the restart model (payctl.components)
    apply      run_ops; a failure names node, operation and output (secrets redacted)
    health     every program RUNNING, the app's /health directly and through nginx
    audit      one JSON line locally and on each node (payctl.audit)

Re-applying with nothing changed adds only comparing operations, which change nothing, and no command at all.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pyinfra.api.state import BaseStateCallback, State

from payctl import audit, hosts, lock, preflight, rolling, runtimes, tls
from payctl.errors import DeployError, PayctlError
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, LiveRoles, Plan, make_plan
from payctl.render import FileKind, RenderedFile, is_lab, render
from payctl.secrets import ADDED_LATER, SECRET_NAMES, Secrets, load_or_create, secrets_path
from payctl.wheelhouse import Wheelhouse, app_source, build

if TYPE_CHECKING:
    from pyinfra.api.host import Host

KAFKA_LIB = Path(__file__).resolve().parents[2] / ".cache" / "kafka" / "lib"
HEALTH_TIMEOUT_S = 120.0


class Hooks(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress: ``node`` is None for steps that concern the whole deployment."""

    def confirm(self, preview: Preview) -> bool:
        """Asked once, after the preview, before anything changes; False aborts."""


@dataclass(frozen=True)
class ApplyRequest:
    inventory: Inventory
    inventory_path: Path
    phase: int
    home: Path
    command: str
    dry_run: bool = False
    only: str | None = None
    break_lock: bool = False
    #: Limit the operations and health checks to these nodes (``payctl scale add-node`` deploys only the new node;
    #: the others are still connected for facts and live roles). None: every active node.
    nodes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FileDiff:
    node: str
    path: str
    new: bool
    diff: str  # unified diff, secrets redacted


@dataclass
class Preview:
    deployment: str
    phase: int
    fake: bool
    work: list[runtimes.NodeWork]
    diffs: list[FileDiff] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return any(w.files or w.artefacts or w.packages or w.actions or w.restart or w.reload or w.rolling
                   for w in self.work)


@dataclass(frozen=True)
class HealthCheck:
    node: str
    check: str
    ok: bool
    detail: str


@dataclass
class ApplyResult:
    preview: Preview
    applied: bool
    health: list[HealthCheck] = field(default_factory=list)
    duration_s: float = 0.0
    lock_broken: tuple[tuple[str, lock.LockInfo], ...] = ()  # (node, lock) removed by --break-lock
    audit_path: Path | None = None
    rolled: list[rolling.Restarted] = field(default_factory=list)  # app restarts one node at a time, out of the LB

    @property
    def changed_files(self) -> list[str]:
        return [f"{w.node}/{p}" for w in self.preview.work for p in (*w.files, *w.artefacts)]

    @property
    def restarted(self) -> list[str]:
        return [f"{w.node}/{p}" for w in self.preview.work for p in (*w.restart, *w.rolling, *w.reload)]


# ------------------------------------------------------------------------------------------------------ helpers


shell_of = hosts.shell_of


def lock_nodes(inv: Inventory) -> list[tuple[str, str]]:
    """Where the deploy lock may live: every node, in inventory order, with its prefix (see ``payctl.lock.take``)."""
    return [(n.name, inv.node_prefix(n.name)) for n in inv.nodes]


def secrets_fingerprint(secrets: Secrets) -> str:
    """A one-way fingerprint of the deployment's secrets, stored on the nodes to detect a mismatched secrets file."""
    h = hashlib.sha256(b"payctl-secrets-v1")
    for name in SECRET_NAMES:
        if name not in ADDED_LATER:
            h.update(b"\0" + secrets[name].reveal().encode())
    return h.hexdigest()[:16]


def marker_text(deployment: str, fingerprint: str) -> str:
    return json.dumps({"deployment": deployment, "secrets": fingerprint}, sort_keys=True) + "\n"


def gather_facts(
    conn: hosts.Connected, prefixes: Mapping[str, str], addresses: Mapping[str, str]
) -> dict[str, runtimes.NodeFacts]:
    out: dict[str, runtimes.NodeFacts] = {}
    for node, host in conn.hosts.items():
        if conn.fake:
            out[node] = runtimes.NodeFacts()
            continue
        ok, stdout, stderr = shell_of(host)(runtimes.facts_script(prefixes[node], addresses[node]))
        if not ok:
            raise DeployError(f"{node}: reading facts failed: {stderr.strip() or stdout.strip() or 'no output'}")
        out[node] = runtimes.parse_facts(stdout)
    return out


def live_roles(facts: Mapping[str, runtimes.NodeFacts]) -> LiveRoles:
    """Who is MariaDB primary / Redis master now, from the running servers (None where nothing runs)."""
    primaries = [n for n, f in facts.items() if f.mariadb_read_only is False]
    masters = [n for n, f in facts.items() if f.redis_role == "master"]
    return LiveRoles(
        mariadb_primary=primaries[0] if len(primaries) == 1 else None,
        redis_master=masters[0] if len(masters) == 1 else None,
    )


def _check_secrets(facts: Mapping[str, runtimes.NodeFacts], fingerprint: str, path: Path) -> None:
    for node, f in facts.items():
        if not f.marker:
            continue
        try:
            theirs = json.loads(f.marker).get("secrets")
        except ValueError:
            continue
        if theirs and theirs != fingerprint:
            raise PayctlError(
                f"{node} runs this deployment with other secrets than {path}",
                hint="restore the secrets file this deployment was created with (or point PAYCTL_HOME at it); "
                "applying would lock the app out of its own database",
            )


def _diff(node: str, f: RenderedFile, current: str | None, redact: Callable[[str], str]) -> FileDiff:
    new = current is None
    if f.kind is FileKind.TLS_KEY:  # a private key is never shown, not even redacted line by line
        what = "added" if new else "changed"
        return FileDiff(node, f.path, new, f"{node}:{f.path}: private key {what} (not shown)\n")
    lines = difflib.unified_diff(
        redact(current or "").splitlines(keepends=True),
        redact(f.text).splitlines(keepends=True),
        fromfile=f"{node}:{f.path} (on the node)" if not new else "/dev/null",
        tofile=f"{node}:{f.path} (rendered)",
        n=1,
    )
    return FileDiff(node, f.path, new, "".join(lines))


def _remote_text(conn: hosts.Connected, node: str, path: str) -> str | None:
    if conn.fake:
        return None
    ok, out, _ = shell_of(conn.host(node))(
        f"if [ -f {shlex.quote(path)} ]; then cat {shlex.quote(path)}; else exit 3; fi"
    )
    if not ok:
        return None
    return out + ("\n" if out and not out.endswith("\n") else "")


class _Progress(BaseStateCallback):
    def __init__(self, conn: hosts.Connected, hooks: Hooks) -> None:
        self.hooks = hooks
        self.node_of = {h.name: n for n, h in conn.hosts.items()}

    def operation_host_start(self, state: State, host: Host, op_hash: Any) -> None:  # type: ignore[override]
        names = sorted(state.get_op_meta(op_hash).names)
        self.hooks.step(self.node_of.get(host.name, host.name), names[0] if names else "operation")


# ------------------------------------------------------------------------------------------------------ apply


def _builder(inv: Inventory, plan: Plan) -> Callable[[runtimes.BuildContext, str], runtimes.NodeWork]:
    if inv.runtime == "compose":
        return runtimes.build_compose
    return runtimes.build_lab if is_lab(plan) else runtimes.build_systemd


def apply(req: ApplyRequest, hooks: Hooks) -> ApplyResult:
    """Bring the deployment to ``req.phase``. Dry runs return the preview without changing anything."""
    started = time.monotonic()
    inv = req.inventory
    # An impossible plan (over-commit, a phase the nodes cannot carry) is refused before any host is contacted;
    # the plan that is applied is made again below with the live roles.
    make_plan(inv, load_phase(req.phase))
    fake = req.dry_run and not hosts.is_lab(inv)
    prefixes = {n.name: inv.node_prefix(n.name) for n in inv.nodes}
    addresses = {n.name: n.private_address for n in inv.nodes}
    hooks.step(None, "connect" + (" (fake connector: nothing is contacted)" if fake else ""))
    with hosts.connect(inv, req.home, fake=fake) as conn:
        hooks.step(None, "facts")
        facts = gather_facts(conn, prefixes, addresses)
        held: lock.Taken | None = None
        if not req.dry_run:
            hooks.step(None, "deploy lock")
            with hosts.node_shells(inv, req.home, conn=conn) as open_shell:
                held = lock.take(lock_nodes(inv), open_shell, lock.new_info(inv.deployment, req.command),
                                 break_lock=req.break_lock)  # fmt: skip
        result: ApplyResult | None = None
        error: PayctlError | None = None
        try:
            result = _apply_locked(req, hooks, conn, facts, fake)
            result.lock_broken = tuple(held.broken) if held else ()
            return result
        except PayctlError as exc:
            error = exc
            raise
        except KeyboardInterrupt:
            # Ctrl-C: the audit line must not say "ok"; the lock is still released below.
            error = DeployError("interrupted (SIGINT) during the apply")
            raise
        finally:
            if held is not None:
                _finish(req, conn, prefixes, result, error, started)
                lock.give_back(held)


def _finish(req: ApplyRequest, conn: hosts.Connected, prefixes: Mapping[str, str], result: ApplyResult | None,
            error: PayctlError | None, started: float) -> None:  # fmt: skip
    """The audit line, locally and on every node; never hides the original error."""
    if result is not None and not result.applied and result.preview.changes:
        outcome = "aborted"
    else:
        outcome = "ok" if error is None else "failed"
    record = audit.AuditRecord(
        deployment=req.inventory.deployment,
        command=req.command,
        phase=req.phase,
        inventory=str(req.inventory_path),
        inventory_sha256=audit.inventory_hash(req.inventory_path) if req.inventory_path.is_file() else "",
        nodes=tuple(conn.hosts),
        result=outcome,
        changed_files=tuple(result.changed_files) if result else (),
        restarted=tuple(result.restarted) if result else (),
        error=(error.message if error else ""),
        duration_s=round(time.monotonic() - started, 2),
    )
    redact = conn.redact
    local = audit.append_local(req.home, record, redact)
    if result is not None:
        result.audit_path = local
        result.duration_s = record.duration_s
    line = record.line(redact)
    for node, host in conn.hosts.items():
        shell_of(host)(audit.append_command(prefixes[node], line))


def _apply_locked(req: ApplyRequest, hooks: Hooks, conn: hosts.Connected, facts: Mapping[str, runtimes.NodeFacts],
                  fake: bool) -> ApplyResult:  # fmt: skip
    inv = req.inventory
    live = any(f.live for f in facts.values())
    hooks.step(None, "secrets")
    have_secrets = secrets_path(req.home, inv.deployment).is_file()
    secrets: Secrets | None = None
    if not (req.dry_run and not have_secrets and not live):
        secrets = load_or_create(req.home, inv.deployment, allow_create=not live and not req.dry_run)
        conn.redact = secrets.redact
        _check_secrets(facts, secrets_fingerprint(secrets), secrets_path(req.home, inv.deployment))
    hooks.step(None, "plan")
    roles = live_roles(facts)
    plan = make_plan(inv, load_phase(req.phase), live_roles=roles)
    if not conn.fake:
        hooks.step(None, "ports")
        handled = preflight.DEBIAN_DAEMONS if inv.runtime == "native" and not is_lab(plan) else ()
        preflight.check_free_ports(plan, facts, {n: shell_of(h) for n, h in conn.hosts.items()}, req.nodes, handled)
    hooks.step(None, "render")
    clear = {n: secrets[n].reveal() for n in secrets.names()} if secrets else None
    rendered = render(plan, clear)
    # The lb node's TLS certificate and key (when the inventory turns TLS on) ship like rendered files.
    rendered.update({f.key: f for f in tls.node_files(plan, inv, req.home, dry_run=req.dry_run)})
    house: Wheelhouse | None = None
    if inv.runtime == "native" and any(n.app or n.relay or n.consumer for n in plan.active_nodes):
        hooks.step(None, "wheelhouse (pip wheel ./app, cached by content hash)")
        python = next((f.python for f in facts.values() if f.python), None)
        house = build(req.home / "wheelhouse", python)
    kafka_lib = KAFKA_LIB if KAFKA_LIB.is_dir() else None
    if kafka_lib is None and any(n.kafka for n in plan.active_nodes) and inv.runtime == "native":
        raise PayctlError(f"the Kafka jar bundle is missing ({KAFKA_LIB})", hint="run scripts/fetch-kafka first")
    marker = marker_text(inv.deployment, secrets_fingerprint(secrets) if secrets else "dry-run")
    build_node = _builder(inv, plan)
    # With several app nodes behind the LB their app restarts wait for the operations, then go one node at a time
    # out of the LB (compose recreates containers itself: not there).
    topo = plan.topology
    rolling_nodes = set(topo.lb_upstreams) if len(topo.lb_upstreams) > 1 and inv.runtime == "native" else set()
    works: list[runtimes.NodeWork] = []
    diffs: list[FileDiff] = []
    for node in plan.active_nodes:
        if req.nodes is not None and node.name not in req.nodes:
            continue
        hooks.step(node.name, "compare with the node")
        files = {f.path: f for f in rendered.values() if f.node == node.name}
        remote = None
        if not conn.fake:
            script = runtimes.state_script(runtimes.node_paths(node.prefix, files, runtimes.LAB_DIRS))
            ok, out, err = shell_of(conn.host(node.name))(script)
            if not ok:
                raise DeployError(f"{node.name}: reading the state of its files failed: {err.strip() or out.strip()}")
            remote = runtimes.parse_state(out)
        ctx = runtimes.BuildContext(
            conn,
            plan,
            node,
            files,
            facts[node.name],
            house,
            kafka_lib,
            req.only,
            app_source() if inv.runtime == "compose" else None,
            req.home / "bundles",
            remote,
            firewall=inv.firewall.enabled,
            rolling_apps=node.name in rolling_nodes,
        )
        work = build_node(ctx, marker)
        works.append(work)
        for path in work.files:
            if path in files:
                current = _remote_text(conn, node.name, f"{node.prefix}/{path}")
                d = _diff(node.name, files[path], current, conn.redact)
                diffs.append(d)
                if d.new:
                    work.new_files.append(path)
    preview = Preview(inv.deployment, req.phase, fake, works, diffs)
    rolled: list[rolling.Restarted] = []
    if req.dry_run:
        return ApplyResult(preview, applied=False)
    if preview.changes:
        if not hooks.confirm(preview):
            return ApplyResult(preview, applied=False)
        conn.state.add_callback_handler(_Progress(conn, hooks))  # type: ignore[no-untyped-call]
        conn.run()
        rolled = _rolling_restarts(conn, plan, works, hooks)
    health = check_health(conn, plan, hooks, nodes=req.nodes)
    bad = [h for h in health if not h.ok]
    if bad:
        raise DeployError(
            "health check failed: " + "; ".join(f"{h.node}: {h.check}: {conn.redact(h.detail)}" for h in bad),
            hint="see `payctl logs -i INV --node NODE --component COMPONENT`; fix and re-apply",
        )
    return ApplyResult(preview, applied=preview.changes, health=health, rolled=rolled)


def _rolling_restarts(conn: hosts.Connected, plan: Plan, works: list[runtimes.NodeWork],
                      hooks: Hooks) -> list[rolling.Restarted]:  # fmt: skip
    """The app restarts the operations left to us (``NodeWork.rolling``): one node at a time, out of the LB."""
    todo = [w for w in works if w.rolling or w.rolling_update]
    done: list[rolling.Restarted] = []
    if not todo:
        return done
    lab, lb_node = is_lab(plan), plan.topology.lb
    lb = rolling.NodeShell(conn, lb_node, plan.node(lb_node).prefix, lab) if lb_node in conn.hosts else None
    for w in todo:
        node = plan.node(w.node)
        r = rolling.restart_behind_lb(
            rolling.NodeShell(conn, w.node, node.prefix, lab), lb, f"{node.private_address}:{PORTS['app']}",
            tuple(w.rolling), update=w.rolling_update,
            healthy=functools.partial(healthy, conn, plan, hooks, w.node), step=hooks.step,
        )  # fmt: skip
        if r.programs:
            done.append(r)
    return done


def healthy(conn: hosts.Connected, plan: Plan, hooks: Hooks, node: str,
            timeout: float = HEALTH_TIMEOUT_S) -> tuple[bool, str]:  # fmt: skip
    """``check_health`` of one node: (all passed, what failed)."""
    bad = [c for c in check_health(conn, plan, hooks, timeout=timeout, nodes=(node,)) if not c.ok]
    return not bad, "; ".join(f"{c.check}: {conn.redact(c.detail)[:200]}" for c in bad)


# ------------------------------------------------------------------------------------------------------ health


def _supervisor_states(shell: lock.Shell, prefix: str) -> dict[str, str]:
    conf = shlex.quote(f"{prefix}/supervisor/supervisord.conf")
    _, out, _ = shell(f"supervisorctl -c {conf} status")
    states: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


def _http(shell: lock.Shell, url: str) -> tuple[bool, str]:
    """GET from the node itself; healthy means HTTP 2xx and, for a JSON body with a status, ``"status": "ok"``."""
    ok, out, err = shell(f"curl -fsS -m 3 {'-k ' if url.startswith('https:') else ''}{shlex.quote(url)}")
    body = (out or err).strip()
    if ok:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "status" in doc and doc["status"] != "ok":
            ok = False
    return ok, body[:300]


def check_health(
    conn: hosts.Connected,
    plan: Plan,
    hooks: Hooks,
    timeout: float = HEALTH_TIMEOUT_S,
    nodes: tuple[str, ...] | None = None,
) -> list[HealthCheck]:
    """Poll until every program is RUNNING and the app answers /health directly and through nginx, or time out."""
    if conn.fake:
        return []
    lab = is_lab(plan)
    results: list[HealthCheck] = []
    for node in plan.active_nodes:
        if nodes is not None and node.name not in nodes:
            continue
        hooks.step(node.name, "health checks")
        shell = shell_of(conn.host(node.name))
        deadline = time.monotonic() + timeout
        if lab:
            states: dict[str, str] = {}
            while time.monotonic() < deadline:
                states = _supervisor_states(shell, node.prefix)
                if states and all(s == "RUNNING" for s in states.values()):
                    break
                time.sleep(0.5)
            bad = {k: v for k, v in states.items() if v != "RUNNING"}
            results.append(
                HealthCheck(
                    node.name,
                    "programs RUNNING",
                    bool(states) and not bad,
                    ", ".join(f"{k} {v}" for k, v in bad.items()) or f"{len(states)} running",
                )
            )
        checks: list[tuple[str, str]] = []
        if node.app is not None:
            checks.append(("app /health", f"http://{node.private_address}:{PORTS['app']}/health"))
        if node.nginx is not None and node.nginx.tls:  # HTTP only redirects then; the pair may be self-signed (-k)
            checks.append(("nginx → app /health", f"https://{node.nginx.listen_address}:{PORTS['https']}/health"))
        elif node.nginx is not None:
            checks.append(("nginx → app /health", f"http://{node.nginx.listen_address}:{PORTS['http']}/health"))
        for name, url in checks:
            ok, detail = False, ""
            while time.monotonic() < deadline:
                ok, detail = _http(shell, url)
                if ok:
                    break
                time.sleep(0.5)
            results.append(HealthCheck(node.name, name, ok, detail))
    return results
