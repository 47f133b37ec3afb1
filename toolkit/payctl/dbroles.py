"""``payctl failover db``: the MariaDB failover of ``payctl.failover`` on a deployment's nodes, then the app repointed.

lock        the deploy lock, on the first node that answers SSH (``payctl.lock.take``): a failover never runs beside
            an apply. When that node is the dead one, ``--break-lock`` takes it on the next node that answers;
            one audit line, locally and on the lock's node
roles       the live roles from the nodes (who is writable now); the nodes that do not answer are listed
switch      ``failover.switchover`` (--planned) or ``failover.promote`` (--force; the old primary may be gone)
persist     each DB node's my.cnf rewritten for its new role (the live settings already match: no restart), so a
            later apply finds nothing to change there and never restarts a database for it
repoint     each app node in turn: app.env rendered from the new live roles (its DB URL names the new primary), the
            app programs restarted (payapp drains in-flight requests on SIGTERM; nginx sends new ones to the other
            node meanwhile), its /health waited for. A later ``phaseN apply`` plans from the same live roles, so it
            finds app.env unchanged and never undoes the failover
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from payctl import audit, components, deploy, failover, hosts, lock, rolling, scale
from payctl.errors import PayctlError
from payctl.gate import deployed_phase
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, LiveRoles, make_plan
from payctl.render import REPLICATION_USER, SEMISYNC_TIMEOUT_MS, render
from payctl.replication import ReplicaSpec
from payctl.secrets import load_or_create, secrets_path

Mode = Literal["planned", "force"]
T = TypeVar("T")


@dataclass(frozen=True)
class FailoverRequest:
    inventory: Inventory
    inventory_path: Path
    promote: str
    mode: Mode
    home: Path
    command: str
    break_lock: bool = False
    #: False when the caller already holds the deploy lock (the kill-db-primary drill runs this under its own).
    take_lock: bool = True


class Progress(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress."""


def _locked(inv: Inventory, home: Path, inventory_path: Path | None, command: str, nodes: Sequence[str],
            break_lock: bool, on_lock: Callable[[lock.Taken], None], work: Callable[[], T]) -> T:  # fmt: skip
    """``work()`` under the deploy lock (taken as ``payctl.lock.take`` places it), audited locally and on the lock's
    node; the lock is released however ``work`` ends."""
    started = time.monotonic()
    redact = (load_or_create(home, inv.deployment, allow_create=False).redact
              if secrets_path(home, inv.deployment).is_file() else (lambda t: t))  # fmt: skip
    with hosts.node_shells(inv, home) as open_shell:
        held = lock.take(deploy.lock_nodes(inv), open_shell, lock.new_info(inv.deployment, command),
                         break_lock=break_lock)  # fmt: skip
        error = "interrupted"
        try:
            on_lock(held)
            out = work()
            error = ""
            return out
        except PayctlError as exc:
            error = exc.message
            raise
        finally:
            try:
                record = audit.AuditRecord(
                    deployment=inv.deployment, command=command, phase=None, inventory=str(inventory_path or ""),
                    inventory_sha256=audit.inventory_hash(inventory_path)
                    if inventory_path and inventory_path.is_file() else "",
                    nodes=tuple(nodes), result="failed" if error else "ok", error=error,
                    duration_s=round(time.monotonic() - started, 2),
                )  # fmt: skip
                audit.append_local(home, record, redact)
                held.shell(audit.append_command(held.prefix, record.line(redact)))
            finally:
                lock.give_back(held)


def _reachable(inv: Inventory, home: Path, names: list[str]) -> list[str]:
    ok = []
    for n in names:
        try:
            with hosts.connect(inv, home, nodes=[n], timeout=5):
                ok.append(n)
        except PayctlError:
            continue
    return ok


def _repoint(conn: hosts.Connected, node: str, prefix: str, address: str, env_text: str) -> None:
    shell = deploy.shell_of(conn.host(node))
    scale._swap(conn, node, prefix, "app.env", env_text, None)
    conf = shlex.quote(f"{prefix}/supervisor/supervisord.conf")
    programs = " ".join(components.APP_PROGRAMS)
    _, out, err = shell(
        f"if [ -S {shlex.quote(prefix + '/run/supervisor.sock')} ]; then supervisorctl -c {conf} restart {programs}; "
        f"else systemctl restart {programs}; fi"
    )
    # "not running" then "already started": the program had exited and supervisord's autorestart started it again
    # between our stop and start, after the new app.env was in place; the health check below still has the word.
    harmless = (*rolling.HARMLESS, "no such process")
    bad = [ln for ln in out.splitlines() if "ERROR" in ln and not any(ok in ln for ok in harmless)]
    if bad:
        raise PayctlError(f"{node}: restarting the app failed: {'; '.join(bad)[:300]} {err.strip()[:200]}")
    deadline = time.monotonic() + 60
    url = f"http://{address}:{PORTS['app']}/health"
    while not shell(f"curl -fsS -m 2 {shlex.quote(url)}")[0]:
        if time.monotonic() > deadline:
            raise PayctlError(f"{node}: the app did not answer {url} within 60 s after the repoint",
                              hint="payctl logs -i INV --node NODE --component app")  # fmt: skip
        time.sleep(0.5)


def failover_db(req: FailoverRequest, hooks: Progress,
                on_lock: Callable[[lock.Taken], None] = lambda _: None) -> failover.FailoverResult:  # fmt: skip
    """Under the deploy lock: switch or promote, persist the roles in my.cnf, repoint the app; raises PayctlError
    naming what is left. ``on_lock`` is told where the lock was taken (and what --break-lock removed)."""
    inv = req.inventory
    db_nodes = [n.name for n in inv.nodes if "mariadb" in n.roles]
    if req.promote not in db_nodes:
        raise scale.ScaleRefused(f"{req.promote} carries no MariaDB (DB nodes: {', '.join(db_nodes)})",
                                 hint="pass a replica's node name to --promote")  # fmt: skip
    if not req.take_lock:
        return _failover_db(req, hooks, db_nodes)
    hooks.step(None, "deploy lock")
    return _locked(inv, req.home, req.inventory_path, req.command, db_nodes, req.break_lock, on_lock,
                   lambda: _failover_db(req, hooks, db_nodes))  # fmt: skip


def _failover_db(req: FailoverRequest, hooks: Progress, db_nodes: list[str]) -> failover.FailoverResult:
    inv = req.inventory
    phase = deployed_phase(inv.deployment, req.home) or 5
    secrets = load_or_create(req.home, inv.deployment, allow_create=False)
    clear = {n: secrets[n].reveal() for n in secrets.names()}
    spec = ReplicaSpec(REPLICATION_USER, clear["mariadb_replication"], (scale.DATABASE,), SEMISYNC_TIMEOUT_MS)
    hooks.step(None, "live roles")
    up = _reachable(inv, req.home, db_nodes)
    if req.promote not in up:
        raise PayctlError(f"{req.promote} does not answer over SSH", hint="promote a node that is reachable")
    with hosts.connect(inv, req.home, nodes=up, redact=secrets.redact) as conn:
        prefixes = {n: inv.node_prefix(n) for n in up}
        addresses = {n.name: n.private_address for n in inv.nodes}
        facts = deploy.gather_facts(conn, prefixes, addresses)
        live = deploy.live_roles(facts)
        plan = make_plan(inv, load_phase(phase), live_roles=live)
        nodes = {n: scale.db_node(plan, n, scale.SshIO(conn.host(n))) for n in up}
        old = live.mariadb_primary
        if old == req.promote:
            raise scale.ScaleRefused(f"{req.promote} is already the primary", hint="nothing to do")
        if req.mode == "planned":
            if old is None or old not in nodes:
                raise PayctlError("no reachable writable primary: a planned switchover needs it",
                                  hint="use --force when the primary is gone")  # fmt: skip
            result = failover.switchover(nodes[old], nodes[req.promote], spec, lambda s: hooks.step(req.promote, s))
        else:
            # The primary is gone: its host may still answer SSH while its MariaDB does not. Only servers that
            # answer are candidates; with no writable node left, the silent one is the old primary (fenced by its
            # my.cnf below, and by `failover.fence` when it returns).
            answering = [n for n in up if facts[n].mariadb_read_only is not None]
            if req.promote not in answering:
                raise PayctlError(f"{req.promote}'s MariaDB does not answer: it cannot be promoted",
                                  hint="start its server first (see payctl logs --component mariadb)")  # fmt: skip
            if old is None:
                old = next((n for n in db_nodes if n not in answering), None)
            others = [nodes[n] for n in answering if n not in (req.promote, old)]
            result = failover.promote([nodes[req.promote], *others], nodes.get(old) if old else None, spec,
                                      step=lambda s: hooks.step(req.promote, s))  # fmt: skip
            if old and old not in nodes:  # its host does not answer: promote() only saw "(unknown)"
                result.old_primary = old
            if result.new_primary != req.promote:
                hooks.step(None, f"{result.new_primary} was more advanced than {req.promote} and was promoted")
        new_live = LiveRoles(mariadb_primary=result.new_primary, redis_master=live.redis_master)
        new_plan = make_plan(inv, load_phase(phase), live_roles=new_live)
        files = render(new_plan, clear)
        for f in files.values():
            if f.path == "mariadb/my.cnf" and f.node in up:
                hooks.step(f.node, "my.cnf for its new role (no restart)")
                scale._swap(conn, f.node, inv.node_prefix(f.node), f.path, f.text, None)
        for node in new_plan.active_nodes:
            if node.name in up and node.app is not None and f"{node.name}/app.env" in files:
                hooks.step(node.name, "repoint the app at the new primary (app.env, restart, /health)")
                _repoint(conn, node.name, node.prefix, node.private_address, files[f"{node.name}/app.env"].text)
    return result


def failover_redis(inv: Inventory, home: Path, promote: str, hooks: Progress, *, break_lock: bool = False,
                   command: str = "failover redis", inventory_path: Path | None = None,
                   on_lock: Callable[[lock.Taken], None] = lambda _: None) -> list[str]:  # fmt: skip
    """Manual Redis failover for inventories without a witness (no safe Sentinel quorum), under the deploy lock:
    ``promote`` becomes the master, the other reachable Redis nodes replicate from it. The app's REDIS_URL is
    repointed by the next apply, which plans from the live roles."""
    if any("witness" in n.roles for n in inv.nodes):
        raise scale.ScaleRefused(
            "this deployment has a witness: its three Sentinels fail Redis over by themselves",
            hint="check `SENTINEL get-master-addr-by-name payctl` on a Sentinel instead",
        )
    redis_nodes = [n.name for n in inv.nodes if "redis" in n.roles]
    if promote not in redis_nodes:
        raise scale.ScaleRefused(f"{promote} carries no Redis (Redis nodes: {', '.join(redis_nodes)})",
                                 hint="pass a Redis replica's node name to --promote")  # fmt: skip
    secrets = load_or_create(home, inv.deployment, allow_create=False)
    password = secrets["redis_sentinel"].reveal()
    hooks.step(None, "deploy lock")
    return _locked(inv, home, inventory_path, command, redis_nodes, break_lock, on_lock,
                   lambda: _failover_redis(inv, home, promote, hooks, redis_nodes, secrets.redact, password))


def _failover_redis(inv: Inventory, home: Path, promote: str, hooks: Progress, redis_nodes: list[str],
                    redact: Callable[[str], str], password: str) -> list[str]:  # fmt: skip
    up = _reachable(inv, home, redis_nodes)
    if promote not in up:
        raise PayctlError(f"{promote} does not answer over SSH", hint="promote a node that is reachable")
    with hosts.connect(inv, home, nodes=up, redact=redact) as conn:
        nodes = {}
        for n in up:
            address, workdir = inv.node(n).private_address, f"{inv.node_prefix(n)}/payctl/tmp"
            nodes[n] = failover.RedisNode(n, address, PORTS["redis"], workdir, scale.SshIO(conn.host(n)))
        hooks.step(promote, "SLAVEOF NO ONE, the others follow it")
        others = [nodes[n] for n in up if n != promote]
        return failover.redis_promote(nodes[promote], others, "sentinel", password)
