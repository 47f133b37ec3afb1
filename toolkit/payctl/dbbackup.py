"""``payctl backup`` and ``payctl restore`` on a deployment: pick the nodes, connect, call ``payctl.backup`` and
``payctl.restore``. No printing; progress through ``Progress.step``.

The backup source is a replica whose replication threads run (live roles read from the nodes, as ``payctl status``
and failover do), else the primary. Backups land in ``$PAYCTL_HOME/<deployment>/backups/<ID>/`` unless ``--to``.
A restore goes to a scratch instance on ``--node`` (default: the backup's source node when the inventory has it, else
the first DB node) at ``--port`` (default 3307), bound to that node's private address so the app account of the
restored grants can log in there for ``payapp reconcile``.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from payctl import backup, deploy, hosts, replication, restore
from payctl.backup import BackupError, Manifest
from payctl.errors import DeployError
from payctl.gate import deployed_phase
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import PORTS, NodePlan, Plan, make_plan
from payctl.render import DATABASE, backup_layout, backup_retention, payapp_bin
from payctl.scale import SshIO, db_node
from payctl.secrets import load_or_create

RESTORE_PORT = 3307


class Progress(Protocol):
    def step(self, node: str | None, step: str) -> None:
        """Progress."""


class SshFiles(SshIO):
    """``backup.NodeFiles`` over SSH: commands, 0600 files, and files copied off/onto the node with SFTP."""

    def fetch(self, remote: str, local: Path) -> None:
        if not self.host.get_file(remote, str(local)):
            raise BackupError(f"{self.host.name}: cannot copy {remote} off the node")

    def push(self, local: Path, remote: str) -> None:
        if not self.host.put_file(str(local), remote):
            raise BackupError(f"{self.host.name}: cannot copy {local.name} to {remote}")


def backups_dir(home: Path, deployment: str, to: Path | None = None) -> Path:
    return to if to is not None else home / deployment / "backups"


def _native_only(inv: Inventory) -> None:
    if inv.runtime != "native":
        raise BackupError(f"payctl backup/restore drive native deployments; {inv.deployment} runs on {inv.runtime}",
                          hint="its DB node backs up daily into <prefix>/backups by payctl-backup.timer (runs "
                          "backup-daily.sh in the MariaDB container); copy those off (docs/operations.md)")  # fmt: skip


def _plan(inv: Inventory, home: Path) -> tuple[Plan, dict[str, bool | None]]:
    """The deployed phase's plan with the live roles, and each DB node's read_only (None: no server answers)."""
    db_nodes = [n.name for n in inv.nodes if "mariadb" in n.roles]
    prefixes = {n: inv.node_prefix(n) for n in db_nodes}
    addresses = {n.name: n.private_address for n in inv.nodes}
    with hosts.connect(inv, home, nodes=db_nodes) as conn:
        facts = deploy.gather_facts(conn, prefixes, addresses)
    phase = deployed_phase(inv.deployment, home) or 1
    plan = make_plan(inv, load_phase(phase), live_roles=deploy.live_roles(facts))
    return plan, {n: f.mariadb_read_only for n, f in facts.items()}


def _admin(node: NodePlan) -> str:
    return f"mariadb --socket={shlex.quote(node.prefix + '/run/mariadb.sock')} -uroot"


def choose_source(plan: Plan, read_only: dict[str, bool | None], conn: hosts.Connected) -> tuple[str, str, str]:
    """(node, role, why): a replica with both replication threads running, else the primary."""
    primary = plan.topology.mariadb_primary
    for name in plan.topology.mariadb_replicas:
        if read_only.get(name) is not True or name not in conn.hosts:
            continue
        st = replication.status(db_node(plan, name, SshIO(conn.host(name))))
        if st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
            lag = st.get("Seconds_Behind_Master", "?")
            return name, "replica", f"replica of {primary}, replicating ({lag} s behind)"
    if read_only.get(primary) is not False:
        raise BackupError("no MariaDB server of this deployment answers as primary or healthy replica",
                          hint="payctl status -i INV shows the live roles")  # fmt: skip
    why = "the primary (no healthy replica)" if plan.topology.mariadb_replicas else "the primary (no replica)"
    return primary, "primary", why


@dataclass(frozen=True)
class BackupRequest:
    inventory: Inventory
    home: Path
    to: Path | None = None


def run_backup(req: BackupRequest, hooks: Progress) -> backup.BackupResult:
    """One backup of the deployment, copied off its source node into the backups directory, retention applied."""
    inv = req.inventory
    _native_only(inv)
    hooks.step(None, "live roles")
    plan, read_only = _plan(inv, req.home)
    secrets = load_or_create(req.home, inv.deployment, allow_create=False)
    db_nodes = [n for n in (plan.topology.mariadb_primary, *plan.topology.mariadb_replicas)]
    with hosts.connect(inv, req.home, nodes=db_nodes, redact=secrets.redact) as conn:
        name, role, why = choose_source(plan, read_only, conn)
        hooks.step(name, f"backup source: {why}")
        node = plan.node(name)
        src = backup.Source(name, role, SshFiles(conn.host(name)), backup_layout(node),
                            f"{node.prefix}/backups/.payctl", _admin(node))  # fmt: skip
        return backup.take(src, inv.deployment, backups_dir(req.home, inv.deployment, req.to), datetime.now(UTC),
                           backup_retention(node), lambda s: hooks.step(name, s))  # fmt: skip


@dataclass(frozen=True)
class RestoreRequest:
    inventory: Inventory
    home: Path
    backup_id: str
    until: datetime | None = None
    node: str | None = None
    port: int = RESTORE_PORT
    source: Path | None = None  # the backups directory (default: the deployment's)
    fetch_binlogs: bool = True


def restore_target(plan: Plan, manifest: Manifest, node: str | None, port: int, conn_io: backup.NodeFiles,
                   app_password: str, lab: bool) -> restore.Target:  # fmt: skip
    n = plan.node(node or manifest.source_node)
    if port == PORTS["mariadb"]:
        raise BackupError(f"port {port} is the live MariaDB's: payctl restores into a fresh instance, never over it",
                          hint=f"use another --port (default {RESTORE_PORT}); docs/operations.md explains how to "
                          "put restored data in service")  # fmt: skip
    tz = dict(n.app.env).get("PAYAPP_RECONCILE_TZ", "Asia/Seoul") if n.app is not None else "Asia/Seoul"
    return restore.Target(
        name=n.name, io=conn_io, workdir=f"{n.prefix}/restore/{manifest.id}", address=n.private_address, port=port,
        run_as="root" if lab else "mysql", client="mariadb -uroot",
        payapp=f"{payapp_bin(n.prefix)}/payapp" if n.app is not None else "",
        db_url=f"mysql://app:{app_password}@{n.private_address}:{port}/{DATABASE}", reconcile_tz=tz,
    )  # fmt: skip


def pick_node(inv: Inventory, manifest: Manifest, node: str | None) -> str:
    db_nodes = [n.name for n in inv.nodes if "mariadb" in n.roles]
    if node is not None and node not in [n.name for n in inv.nodes]:
        raise BackupError(f"no node named {node!r} in the inventory", hint=f"nodes: {', '.join(db_nodes)}")
    return node or (manifest.source_node if manifest.source_node in db_nodes else db_nodes[0])


def run_restore(req: RestoreRequest, hooks: Progress) -> restore.RestoreResult:
    """Verify the backup, gather the binlogs since it, restore into a scratch instance and report."""
    inv = req.inventory
    _native_only(inv)
    directory = backups_dir(req.home, inv.deployment, req.source)
    manifest = backup.load(directory, req.backup_id)
    hooks.step(None, f"verify backup {manifest.id} ({len(manifest.files)} files, sha256)")
    backup.verify(directory, manifest)
    restore.check_until(manifest, req.until)
    target_name = pick_node(inv, manifest, req.node)
    plan, _ = _plan(inv, req.home)
    secrets = load_or_create(req.home, inv.deployment, allow_create=False)
    lab = hosts.is_lab(inv)
    scratch = Path(tempfile.mkdtemp(prefix=f"payctl-restore-{manifest.id}-"))
    try:
        later: list[Path] = []
        if req.fetch_binlogs and manifest.source_node in [n.name for n in inv.nodes]:
            later = _later_binlogs(inv, req.home, plan, manifest, scratch, hooks, secrets.redact)
        with hosts.connect(inv, req.home, nodes=[target_name], redact=secrets.redact) as conn:
            target = restore_target(plan, manifest, target_name, req.port, SshFiles(conn.host(target_name)),
                                    secrets["mariadb_app"].reveal(), lab)  # fmt: skip
            return restore.restore(manifest, directory, later, target, req.until,
                                   lambda s: hooks.step(target_name, s))  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _later_binlogs(inv: Inventory, home: Path, plan: Plan, manifest: Manifest, dest: Path, hooks: Progress,
                   redact: hosts.Redactor) -> list[Path]:  # fmt: skip
    name = manifest.source_node
    try:
        with hosts.connect(inv, home, nodes=[name], redact=redact, timeout=5) as conn:
            node = plan.node(name)
            src = backup.Source(name, manifest.source_role, SshFiles(conn.host(name)), backup_layout(node),
                                f"{node.prefix}/backups/.payctl", _admin(node))  # fmt: skip
            return backup.fetch_binlogs_since(src, manifest, dest, lambda s: hooks.step(name, s))
    except BackupError as exc:
        hooks.step(name, f"no binlogs since the backup ({exc.message}): replaying the backup's own only")
        return []
    except DeployError as exc:
        hooks.step(name, f"{name} does not answer ({exc.message[:100]}): replaying the backup's own binlogs only")
        return []


def discard_restore(inv: Inventory, home: Path, backup_id: str, node: str | None) -> tuple[str, bool]:
    """Stop and delete the scratch instance of ``backup_id`` on ``node`` (default as for a restore)."""
    directory = backups_dir(home, inv.deployment)
    manifest_source = ""
    path = directory / backup_id / backup.MANIFEST
    if path.is_file():
        manifest_source = Manifest.from_json(path.read_text()).source_node
    db_nodes = [n.name for n in inv.nodes if "mariadb" in n.roles]
    name = node or (manifest_source if manifest_source in db_nodes else db_nodes[0])
    n = inv.node(name)
    prefix = inv.node_prefix(name)
    with hosts.connect(inv, home, nodes=[name]) as conn:
        t = restore.Target(name, SshFiles(conn.host(name)), f"{prefix}/restore/{backup_id}", n.private_address, 0,
                           "root", "", "", "")  # fmt: skip
        return name, restore.discard(t)
