"""``payctl scale add-node``: add the node (and witness) an inventory declares to a running deployment, under traffic.

The order keeps the system correct at every moment; each step up to the LB that changed something records its undo,
and a failure there runs the undos in reverse (``replication`` undoes its own sub-steps):

    1 plan      the phase-5 plan with the live roles (after a failover the hosts win): which node joins, which node
                is the MariaDB primary and the LB; nothing is contacted for a dry run of a non-lab inventory
    2 accounts  on the primary: the phase's users SQL (app/migrate/exporter accounts for the new node's address);
                idempotent, new accounts are dropped again on failure
    3 node      the new node's and the witness's own components (``payctl phase5 apply`` limited to them: packages,
                files, a fresh MariaDB datadir as replica, Redis replica, their Sentinels, app and consumer pointing
                at the primary); undo: their programs stopped
    4 replica   ``payctl.replication.add_replica``: snapshot, CHANGE MASTER on the replica, catch-up, semi-sync; then
                the users SQL once more on the primary, so the accounts (not in the snapshot) replicate to the new node
    5 persist   the primary's my.cnf rewritten with the semi-sync settings already live, and the Redis master's
                redis.conf when only its comments change (no restart of either: a later apply then sees nothing to
                change there)
    6 lb        nginx on the LB node with both upstreams: the file written, ``nginx -t``, a graceful reload (SIGHUP:
                old workers finish their requests); undo: the previous file and another reload
    7 converge  ``payctl phase5 apply`` on every node: the existing node gains its Sentinel, its app the Sentinel
                addresses (restarted out of the LB while nginx sends to the new node), Prometheus the new
                targets. From here on a failure rolls nothing back: the node is added; running the command (or
                ``phase5 apply``) again completes it
    8 kafka     the new controllers join the KRaft quorum, every topic is reassigned to RF 2 (``__consumer_offsets``
                included) and gets the planned min.insync.replicas (``payctl.kafkajoin``)
    9 sentinels every Sentinel names the same master, with the planned quorum, and sees all the others
                (``payctl.sentinels``)
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from payctl import converge, deploy, hosts, lock, replication, rolling
from payctl.errors import DeployError, PayctlError
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, LiveRoles, Plan, make_plan
from payctl.render import REPLICATION_USER, SEMISYNC_TIMEOUT_MS, render
from payctl.runtimes import FIREWALL_FILE, firewall_load_command
from payctl.secrets import load_or_create

if TYPE_CHECKING:
    from pyinfra.api.host import Host

PHASE = 5
DATABASE = "payments"


class ScaleError(PayctlError):
    """Adding a node failed (after the undo of what the command changed)."""


class ScaleRefused(PayctlError):
    """The request cannot be planned (unknown node, the primary itself ...): nothing was contacted or changed."""

    exit_code = 2


@dataclass(frozen=True)
class Step:
    key: str
    node: str
    what: str
    undo: str


@dataclass(frozen=True)
class AddNodePlan:
    deployment: str
    node: str
    primary: str
    lb: str
    plan: Plan
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    joining: tuple[str, ...] = ()  # the node and the witness, deployed by the "node" step


class Hooks(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress."""

    def confirm(self, plan: AddNodePlan) -> bool:
        """Asked once, after the plan is shown, before anything changes; False aborts."""


def plan_add_node(inv: Inventory, node: str, live: LiveRoles | None = None) -> AddNodePlan:
    """What adding ``node`` will do, step by step (pure: no host is contacted)."""
    names = [n.name for n in inv.nodes]
    if node not in names:
        raise ScaleRefused(f"node {node!r} is not in the inventory (it has {', '.join(names)})",
                         hint="add the node to the inventory first (docs/inventory.md)")  # fmt: skip
    plan = make_plan(inv, load_phase(PHASE), live_roles=live or LiveRoles())
    topo = plan.topology
    if node == topo.mariadb_primary or node == topo.lb:
        raise ScaleRefused(f"{node} is the primary/LB node of this deployment, not a node to add",
                         hint="pass the node the running deployment does not have yet (e.g. --node node2)")  # fmt: skip
    np = plan.node(node)
    if np.mariadb is None or np.app is None:
        raise ScaleRefused(f"{node} carries no app and MariaDB in phase {PHASE}: scale add-node adds an app node",
                         hint="check the node's roles in the inventory")  # fmt: skip
    p, lb = topo.mariadb_primary, topo.lb
    # The witness (Sentinel, Kafka controller) joins with the node: a phase-5 apply limited to both.
    joining = (node, *(n.name for n in inv.nodes if n.is_witness and n.name in {a.name for a in plan.active_nodes}))
    steps = (
        Step("accounts", p, f"apply the phase-{PHASE} users SQL on the primary {p} (accounts for {node}'s address)"
             + (f"; the firewall of {', '.join(dict.fromkeys([p, lb]))} admits {node}'s address"
                if inv.firewall.enabled else ""),
             "drop the accounts this step created" + ("; the previous firewall" if inv.firewall.enabled else "")),
        Step("node", node, f"deploy {' and '.join(joining)} (phase {PHASE} apply limited to them): MariaDB (fresh, "
             "read-only replica config), Redis replica, "
             + (f"Sentinels on {' and '.join(joining)}, " if topo.sentinels else "")
             + "Kafka broker, app and consumer", f"stop the programs on {' and '.join(joining)} (data kept)"),
        Step("replica", node, f"seed {node} from an online snapshot of {p} (mariadb-dump --single-transaction "
             f"--master-data=1 --gtid), CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos on {node}, wait for catch-up, "
             f"semi-sync AFTER_SYNC ({SEMISYNC_TIMEOUT_MS} ms timeout)",
             f"detach {node}, drop its seeded data, drop the replication/seed users, semi-sync off on {p}"),
        Step("persist", p, f"write {p}'s my.cnf with the semi-sync settings already live (MariaDB not restarted)",
             "the previous my.cnf"),
        Step("lb", lb, f"nginx on {lb}: upstreams {', '.join(topo.lb_upstreams)}, nginx -t, graceful reload",
             "the previous nginx.conf and a graceful reload"),
        *(Step(*s) for s in converge.steps(plan, node)),
    )  # fmt: skip
    notes = []
    if not topo.sentinels:
        notes.append("no witness in the inventory: no two-Sentinel quorum is deployed; Redis failover is manual "
                     "(payctl failover redis)")  # fmt: skip
    return AddNodePlan(inv.deployment, node, p, lb, plan, steps, tuple(notes), joining)


# ------------------------------------------------------------------------------------------------------ execution


class SshIO:
    """``replication.NodeIO`` over a connected pyinfra host (paramiko): commands, and 0600 files via SFTP."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def run(self, command: str) -> tuple[bool, str, str]:
        return deploy.shell_of(self.host)(command)

    def put_private(self, path: str, text: str) -> None:
        # Created empty with mode 0600 first, so the secret never sits in a file others may read.
        ok, _, err = self.run(f"umask 077 && : > {shlex.quote(path)} && chmod 600 {shlex.quote(path)}")
        if not ok or not self.host.put_file(io.BytesIO(text.encode()), path):
            raise DeployError(f"{self.host.name}: cannot write {path}: {err.strip()}")


def db_node(plan: Plan, name: str, io_: replication.NodeIO) -> replication.DbNode:
    n = plan.node(name)
    return replication.DbNode(
        name=name,
        address=n.private_address,
        port=PORTS["mariadb"],
        client=f"mariadb --socket={shlex.quote(n.prefix + '/run/mariadb.sock')} -uroot",
        workdir=f"{n.prefix}/payctl/tmp",
        io=io_,
    )


@dataclass(frozen=True)
class AddNodeRequest:
    inventory: Inventory
    inventory_path: Path
    node: str
    home: Path
    command: str
    dry_run: bool = False
    catchup_timeout_s: float = 300.0


@dataclass
class AddNodeResult:
    plan: AddNodePlan
    applied: bool
    done: list[str] = field(default_factory=list)
    replica: replication.AddReplicaResult | None = None
    sentinels: list[str] = field(default_factory=list)  # what each Sentinel said once they agreed
    rolled: list[rolling.Restarted] = field(default_factory=list)  # the converge's app restarts


def _live(inv: Inventory, home: Path, fake: bool) -> LiveRoles:
    prefixes = {n.name: inv.node_prefix(n.name) for n in inv.nodes}
    addresses = {n.name: n.private_address for n in inv.nodes}
    with hosts.connect(inv, home, fake=fake) as conn:
        return deploy.live_roles(deploy.gather_facts(conn, prefixes, addresses))


def growth(inv: Inventory, home: Path, *, dry_run: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adding, fresh), read from the hosts once. ``adding``: the app nodes of the inventory that do not run the
    deployment yet while another node does — a running smaller deployment, to which ``payctl phase5 apply`` adds them
    with ``add_node`` (a replica seeded online, not a fresh database). ``fresh``: for a deployment that runs nowhere
    yet, the app nodes beyond the first — a plain phase-5 apply would give each its own empty database and leave its
    Kafka controller an observer, so the CLI deploys the first node (phase 4) and then adds these with ``add_node``.
    Both empty for a dry run with the fake connector (which learns nothing from the hosts)."""
    live, missing = _live_and_missing(inv, home, dry_run=dry_run)
    return (missing, ()) if live else ((), missing[1:])


def _live_and_missing(inv: Inventory, home: Path, *, dry_run: bool) -> tuple[set[str], tuple[str, ...]]:
    if dry_run and not hosts.is_lab(inv):
        return set(), ()
    prefixes = {n.name: inv.node_prefix(n.name) for n in inv.nodes}
    addresses = {n.name: n.private_address for n in inv.nodes}
    with hosts.connect(inv, home) as conn:
        facts = deploy.gather_facts(conn, prefixes, addresses)
    live = {n for n, f in facts.items() if f.live}
    return live, tuple(n.name for n in inv.nodes if "app" in n.roles and n.name not in live)


def add_node(req: AddNodeRequest, hooks: Hooks) -> AddNodeResult:
    """Plan, confirm, then run the steps in order; on a failure undo what was done and raise ScaleError."""
    inv = req.inventory
    fake = req.dry_run and not hosts.is_lab(inv)
    hooks.step(None, "live roles")
    live = _live(inv, req.home, fake)
    plan = plan_add_node(inv, req.node, live)
    if req.dry_run or not hooks.confirm(plan):
        return AddNodeResult(plan, applied=False)
    secrets = load_or_create(req.home, inv.deployment, allow_create=False)
    clear = {n: secrets[n].reveal() for n in secrets.names()}
    files = render(plan.plan, clear)
    by_node: dict[str, dict[str, str]] = {}
    for f in files.values():
        by_node.setdefault(f.node, {})[f.path] = f.text
    result = AddNodeResult(plan, applied=False)
    undo: list[tuple[str, Callable[[], object]]] = []
    try:
        _accounts(req, plan, by_node, hooks, undo, secrets.redact)
        _admit(req, plan, by_node, hooks, undo, secrets.redact)
        _node(req, plan, hooks, undo)
        result.replica = _replica(req, plan, clear, hooks, secrets.redact)
        _accounts_to_replica(req, plan, by_node, hooks, secrets.redact)
        _persist_and_lb(req, plan, by_node, hooks, undo, secrets.redact)
    except PayctlError as exc:
        failed: list[str] = []
        for what, action in reversed(undo):
            hooks.step(None, f"rollback: {what}")
            try:
                action()
            except PayctlError as e:
                failed.append(f"{what}: {e.message}")
        raise ScaleError(
            f"adding {req.node} failed: {exc.message}"
            + (f" (rollback incomplete: {'; '.join(failed)})" if failed else " (rolled back)"),
            hint=exc.hint,
        ) from exc
    # The node is added; what follows completes the deployment and is not rolled back (a re-run completes it).
    try:
        done = converge.CompleteRequest(inv, req.inventory_path, req.home, req.command, plan.plan, clear,
                                        lambda conn, n: SshIO(conn.host(n)))  # fmt: skip
        completed = converge.complete(done, hooks)
        result.sentinels, result.rolled = completed.sentinels, completed.rolled
    except PayctlError as exc:
        raise ScaleError(
            f"{req.node} is added (replica of {plan.primary}, behind the LB) but completing phase {PHASE} failed: "
            f"{exc.message}",
            hint=(exc.hint + "; " if exc.hint else "") + "nothing was rolled back: run the same command again (or "
            f"payctl phase{PHASE} apply) to complete it",
        ) from exc
    result.applied = True
    result.done = [s.key for s in plan.steps]
    return result


def _with_lock(req: AddNodeRequest, plan: AddNodePlan, nodes: list[str], redact: Callable[[str], str],
               work: Callable[[hosts.Connected], object]) -> object:  # fmt: skip
    inv = req.inventory
    with hosts.connect(inv, req.home, nodes=nodes, redact=redact) as conn, \
            hosts.node_shells(inv, req.home, conn=conn) as open_shell:  # fmt: skip
        held = lock.take(deploy.lock_nodes(inv), open_shell, lock.new_info(inv.deployment, req.command))
        try:
            return work(conn)
        finally:
            lock.give_back(held)


def _accounts(req: AddNodeRequest, plan: AddNodePlan, by_node: Mapping[str, Mapping[str, str]], hooks: Hooks,
              undo: list[tuple[str, Callable[[], object]]], redact: Callable[[str], str]) -> None:  # fmt: skip
    p = plan.primary
    sql = by_node[p]["mariadb/users.sql"]
    address = plan.plan.node(req.node).private_address
    hooks.step(p, "accounts for the new node (users SQL on the primary)")

    def work(conn: hosts.Connected) -> None:
        db = db_node(plan.plan, p, SshIO(conn.host(p)))
        replication.query(db, "SELECT 1")
        before = replication.query(db, f"SELECT User FROM mysql.user WHERE Host = '{address}'").split()
        replication.ensure_workdir(db)
        replication.run_secret_sql(db, "users", sql)

        def drop() -> None:
            with hosts.connect(req.inventory, req.home, nodes=[p], redact=redact) as c2:
                d2 = db_node(plan.plan, p, SshIO(c2.host(p)))
                after = replication.query(d2, f"SELECT User FROM mysql.user WHERE Host = '{address}'").split()
                for user in sorted(set(after) - set(before)):
                    replication.query(d2, f"DROP USER IF EXISTS '{user}'@'{address}'")

        undo.append((f"drop the accounts created for {address}", drop))

    _with_lock(req, plan, [p], redact, work)


def _admit(req: AddNodeRequest, plan: AddNodePlan, by_node: Mapping[str, Mapping[str, str]], hooks: Hooks,
           undo: list[tuple[str, Callable[[], object]]], redact: Callable[[str], str]) -> None:  # fmt: skip
    """The running nodes' firewalls (inventory ``firewall.enabled``) admit the new node's address before it is
    deployed: its replica, app and consumer connect to the primary's MariaDB, Redis and Kafka, the LB to its app."""
    inv = req.inventory
    if not inv.firewall.enabled:
        return
    nodes = list(dict.fromkeys([plan.primary, plan.lb]))
    hooks.step(None, f"firewall of {', '.join(nodes)}: admit {req.node}")

    def work(conn: hosts.Connected) -> None:
        for n in nodes:
            prefix = inv.node_prefix(n)
            text = by_node[n][FIREWALL_FILE]
            old = _swap(conn, n, prefix, FIREWALL_FILE, text, firewall_load_command(prefix, text))

            def restore(n: str = n, prefix: str = prefix, old: str = old) -> None:
                with hosts.connect(inv, req.home, nodes=[n], redact=redact) as c2:
                    _swap(c2, n, prefix, FIREWALL_FILE, old, firewall_load_command(prefix, old))

            undo.append((f"restore {n}'s firewall", restore))

    _with_lock(req, plan, nodes, redact, work)


def _accounts_to_replica(req: AddNodeRequest, plan: AddNodePlan, by_node: Mapping[str, Mapping[str, str]],
                         hooks: Hooks, redact: Callable[[str], str]) -> None:  # fmt: skip
    """The snapshot holds no accounts (see ``replication.dump_command``): the users SQL, applied again on the primary
    now that the replica is attached, reaches it through replication, so the app can log in there after a failover."""
    p, n = plan.primary, req.node
    hooks.step(p, "accounts to the replica (users SQL again on the primary, replicated)")

    def work(conn: hosts.Connected) -> None:
        primary = db_node(plan.plan, p, SshIO(conn.host(p)))
        replica = db_node(plan.plan, n, SshIO(conn.host(n)))
        replication.run_secret_sql(primary, "users", by_node[p]["mariadb/users.sql"])
        replication.wait_caught_up(primary, replica, req.catchup_timeout_s)
        if replication.scalar(replica, "SELECT COUNT(*) FROM mysql.user WHERE User = 'app'") == "0":
            raise ScaleError(f"{n}: the app accounts did not arrive through replication")

    _with_lock(req, plan, [p, n], redact, work)


def _node(req: AddNodeRequest, plan: AddNodePlan, hooks: Hooks, undo: list[tuple[str, Callable[[], object]]]) -> None:
    joining = plan.joining or (req.node,)
    hooks.step(req.node, f"deploy {' and '.join(joining)} (phase {PHASE} apply limited to them)")

    def stop() -> None:
        with hosts.connect(req.inventory, req.home, nodes=list(joining)) as conn:
            for n in joining:
                prefix = req.inventory.node_prefix(n)
                deploy.shell_of(conn.host(n))(
                    f"supervisorctl -c {shlex.quote(prefix + '/supervisor/supervisord.conf')} shutdown"
                )

    undo.append((f"stop the programs on {' and '.join(joining)}", stop))
    deploy.apply(
        deploy.ApplyRequest(req.inventory, req.inventory_path, PHASE, req.home, req.command, nodes=joining),
        converge.AutoConfirm(hooks),
    )


def _replica(req: AddNodeRequest, plan: AddNodePlan, clear: Mapping[str, str], hooks: Hooks,
             redact: Callable[[str], str]) -> replication.AddReplicaResult:  # fmt: skip
    p, n = plan.primary, req.node
    spec = replication.ReplicaSpec(REPLICATION_USER, clear["mariadb_replication"], (DATABASE,), SEMISYNC_TIMEOUT_MS,
                                   catchup_timeout_s=req.catchup_timeout_s)  # fmt: skip

    def work(conn: hosts.Connected) -> replication.AddReplicaResult:
        primary = db_node(plan.plan, p, SshIO(conn.host(p)))
        replica = db_node(plan.plan, n, SshIO(conn.host(n)))
        return replication.add_replica(primary, replica, spec, lambda s: hooks.step(n, s))

    out = _with_lock(req, plan, [p, n], redact, work)
    assert isinstance(out, replication.AddReplicaResult)
    return out


def _persist_and_lb(req: AddNodeRequest, plan: AddNodePlan, by_node: Mapping[str, Mapping[str, str]], hooks: Hooks,
                    undo: list[tuple[str, Callable[[], object]]], redact: Callable[[str], str]) -> None:  # fmt: skip
    p, lb = plan.primary, plan.lb
    inv = req.inventory

    def work(conn: hosts.Connected) -> None:
        hooks.step(p, "persist the live semi-sync settings in my.cnf (no restart)")
        cnf = _swap(conn, p, inv.node_prefix(p), "mariadb/my.cnf", by_node[p]["mariadb/my.cnf"], None)

        def restore_cnf() -> None:
            with hosts.connect(inv, req.home, nodes=[p], redact=redact) as c2:
                _swap(c2, p, inv.node_prefix(p), "mariadb/my.cnf", cnf, None)

        undo.append((f"restore {p}'s my.cnf", restore_cnf))
        q = shlex.quote
        m, rel = plan.plan.topology.redis_master, "redis/redis.conf"
        new_conf = by_node.get(m, {}).get(rel)
        if new_conf is not None and m in conn.hosts:
            ok, current, _ = deploy.shell_of(conn.host(m))(f"cat {q(inv.node_prefix(m) + '/' + rel)}")
            if ok and current != new_conf and settings_lines(current) == settings_lines(new_conf):
                # Only the header comment changes (the phase number): the converge apply must not restart the master.
                hooks.step(m, "redis.conf: only comments change, written without a restart")
                _swap(conn, m, inv.node_prefix(m), rel, new_conf, None)
        hooks.step(lb, "nginx: both upstreams, nginx -t, graceful reload")
        prefix = inv.node_prefix(lb)
        reload = (f"nginx -t -q -c {q(prefix + '/nginx/nginx.conf')} -p {q(prefix + '/nginx')} && "
                  f"supervisorctl -c {q(prefix + '/supervisor/supervisord.conf')} signal HUP payctl-nginx")  # fmt: skip
        old = _swap(conn, lb, prefix, "nginx/nginx.conf", by_node[lb]["nginx/nginx.conf"], reload)

        def restore() -> None:
            with hosts.connect(inv, req.home, nodes=[lb], redact=redact) as c2:
                _swap(c2, lb, prefix, "nginx/nginx.conf", old, reload)

        undo.append((f"restore {lb}'s nginx.conf and reload", restore))

    _with_lock(req, plan, list(dict.fromkeys([p, lb, plan.plan.topology.redis_master])), redact, work)


def settings_lines(text: str) -> list[str]:
    """A config file without its comments and blank lines (what the program actually reads)."""
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith(("#", ";"))]


def _swap(conn: hosts.Connected, node: str, prefix: str, rel: str, text: str, check_and_reload: str | None) -> str:
    """Replace a file atomically (keeping its mode); run the check/reload; put the old file back if that fails."""
    shell = deploy.shell_of(conn.host(node))
    path = f"{prefix}/{rel}"
    q = shlex.quote
    ok, old, err = shell(f"cat {q(path)}")
    if not ok:
        raise DeployError(f"{node}: cannot read {path}: {err.strip()}")
    io_ = SshIO(conn.host(node))
    io_.put_private(path + ".payctl-new", text)
    ok, out, err = shell(f"cp -p {q(path)} {q(path + '.payctl-old')} && chmod --reference={q(path)} "
                         f"{q(path + '.payctl-new')} && mv {q(path + '.payctl-new')} {q(path)}")  # fmt: skip
    if not ok:
        raise DeployError(f"{node}: cannot replace {path}: {(err or out).strip()}")
    if check_and_reload:
        ok, out, err = shell(check_and_reload)
        if not ok:
            shell(f"mv {q(path + '.payctl-old')} {q(path)}")
            raise DeployError(f"{node}: {rel} refused, previous file restored: {(err or out).strip()[:400]}")
    shell(f"rm -f {q(path + '.payctl-old')}")
    return old


def describe(plan: AddNodePlan) -> list[str]:
    """The plan as lines (the CLI prints them for --dry-run and before asking)."""
    lines = [f"add {plan.node} to deployment {plan.deployment} (primary {plan.primary}, LB {plan.lb}):"]
    for i, s in enumerate(plan.steps, 1):
        lines.append(f"  {i}. [{s.node}] {s.what}")
        lines.append(f"     undo: {s.undo}")
    lines += [f"  note: {n}" for n in plan.notes]
    return lines


__all__ = ["AddNodePlan", "AddNodeRequest", "AddNodeResult", "Hooks", "ScaleError", "ScaleRefused", "Step",
           "add_node", "describe", "growth", "plan_add_node"]  # fmt: skip
