"""The ``kill-db-primary`` drill's database side (2-node lab): find the primary, promote the replica, re-attach.

* ``primary_address(env_text)``: the host of ``PAYAPP_DB_URL`` in the app node's env file — where the app writes.
* ``promote(...)``: ``payctl.dbroles.failover_db`` in ``force`` mode (what ``payctl failover db --force`` does):
  the most advanced replica becomes the primary, roles persisted in my.cnf, every app repointed and restarted.
* ``reattach(...)``: the old primary, started again, is fenced (read-only) and made a replica of the new primary
  (``payctl.failover.fence``), so the deployment is whole again, with the roles swapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from payctl import dbroles, deploy, failover, hosts, scale
from payctl.errors import ConfigError
from payctl.gate import deployed_phase
from payctl.inventory import Inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import REPLICATION_USER, SEMISYNC_TIMEOUT_MS
from payctl.replication import ReplicaSpec
from payctl.secrets import load_or_create


def primary_address(env_text: str) -> str:
    """The database host the app writes to, from its env file text (no other value is kept)."""
    for line in env_text.splitlines():
        if line.startswith("PAYAPP_DB_URL="):
            host = urlsplit(line.split("=", 1)[1].strip()).hostname
            if host:
                return host
    raise ConfigError("the app's env file names no PAYAPP_DB_URL host", hint="is the app deployed on that node?")


@dataclass(frozen=True)
class DbFailover:
    inventory: Inventory
    inventory_path: Path
    home: Path
    old: str  # the primary the drill kills
    new: str  # the replica it promotes


class _Steps:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, node: str | None, step: str) -> None:
        self.lines.append(f"{node or '-'}: {step}")


def promote(f: DbFailover) -> str:
    """Promote ``f.new`` by force and repoint the apps; returns what was done, in one line."""
    steps = _Steps()
    # take_lock=False: this runs inside the drill, which holds the deploy lock.
    req = dbroles.FailoverRequest(f.inventory, f.inventory_path, f.new, "force", f.home,
                                  f"drill kill-db-primary: failover db --promote {f.new} --force",
                                  take_lock=False)  # fmt: skip
    result = dbroles.failover_db(req, steps)
    return f"{result.new_primary} promoted at GTID {result.gtid or '-'} ({len(steps.lines)} steps)"


def reattach(f: DbFailover) -> None:
    """The old primary (running again) becomes a read-only replica of the new one."""
    inv = f.inventory
    secrets = load_or_create(f.home, inv.deployment, allow_create=False)
    clear = {n: secrets[n].reveal() for n in secrets.names()}
    spec = ReplicaSpec(REPLICATION_USER, clear["mariadb_replication"], (scale.DATABASE,), SEMISYNC_TIMEOUT_MS)
    names = [f.old, f.new]
    with hosts.connect(inv, f.home, nodes=names, redact=secrets.redact) as conn:
        prefixes = {n: inv.node_prefix(n) for n in names}
        addresses = {n.name: n.private_address for n in inv.nodes}
        live = deploy.live_roles(deploy.gather_facts(conn, prefixes, addresses))
        plan = make_plan(inv, load_phase(deployed_phase(inv.deployment, f.home) or 5), live_roles=live)
        nodes = {n: scale.db_node(plan, n, scale.SshIO(conn.host(n))) for n in names}
        failover.fence(nodes[f.old], nodes[f.new], spec)
