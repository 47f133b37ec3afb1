"""Day-to-day views and the stop switch of a deployment: ``status``, ``logs`` and ``down``.

All three go over the same SSH connection layer as apply (payctl.hosts). In the lab the programs run under the
node's supervisord (``supervisorctl status``, logs in ``<prefix>/logs/<program>.log``); on VMs they are systemd units
(``systemctl``/``journalctl``). ``down`` takes the deploy lock, stops every program and the supervisor, and with
``purge_data`` removes datadirs, the payapp releases and the markers, so the next apply starts from scratch.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from payctl import audit, hosts, lock, replication, runtimes
from payctl.deploy import shell_of
from payctl.errors import ConfigError, DeployError
from payctl.inventory import Inventory
from payctl.plan import PORTS


@dataclass(frozen=True)
class ProgramStatus:
    name: str
    state: str  # RUNNING, STOPPED, FATAL, BACKOFF ... (supervisor) or active/failed (systemd)
    pid: int | None
    uptime: str


@dataclass(frozen=True)
class NodeStatus:
    node: str
    address: str
    reachable: bool
    error: str = ""
    programs: tuple[ProgramStatus, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)
    health: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    supervisor_uptime: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "address": self.address,
            "reachable": self.reachable,
            "error": self.error,
            "programs": [p.__dict__ for p in self.programs],
            "roles": self.roles,
            "health": self.health,
            "versions": self.versions,
        }


def _supervisor_conf(prefix: str) -> str:
    return shlex.quote(f"{prefix}/supervisor/supervisord.conf")


def parse_supervisor_status(text: str) -> list[ProgramStatus]:
    """``payctl-app  RUNNING   pid 949, uptime 0:00:08`` lines -> ProgramStatus."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("payctl-"):
            continue
        rest = parts[2] if len(parts) > 2 else ""
        pid = None
        uptime = ""
        if rest.startswith("pid "):
            pid_text, _, up = rest[4:].partition(",")
            pid = int(pid_text) if pid_text.strip().isdigit() else None
            uptime = up.strip().removeprefix("uptime ").strip()
        out.append(ProgramStatus(parts[0], parts[1], pid, uptime or rest))
    return out


def _status_script(prefix: str, private: str, lab: bool) -> str:
    p = shlex.quote(prefix)
    if lab:
        programs = f"supervisorctl -c {_supervisor_conf(prefix)} status 2>/dev/null"
    else:
        programs = (
            "systemctl list-units 'payctl-*' --all --no-legend --plain 2>/dev/null | "
            "awk '{print $1, toupper($4)}' | sed 's/\\.service//'"
        )
    return f"""P={p}
echo '--- programs'
{programs}
echo '--- versions'
echo "payapp=$($P/venv/bin/python -c 'import importlib.metadata as m; print(m.version("payapp"))' 2>/dev/null)"
echo "mariadb=$(mariadbd --version 2>/dev/null | awk '{{print $3}}')"
echo "redis=$(redis-server --version 2>/dev/null | awk '{{print $3}}' | sed 's/v=//')"
echo "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\\///')"
echo '--- health'
curl -sS -m 3 http://{private}:{PORTS["app"]}/health 2>&1 | head -c 300; echo
exit 0
"""


def _sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("--- "):
            current = line[4:].strip()
            out[current] = []
        elif current:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def status(inv: Inventory, home: Path, lab: bool) -> list[NodeStatus]:
    """Per node: programs and their state, roles, health, versions. An unreachable node is reported, not raised."""
    rows: list[NodeStatus] = []
    for node in inv.nodes:
        prefix = inv.node_prefix(node.name)
        try:
            with hosts.connect(inv, home, nodes=[node.name]) as conn:
                shell = shell_of(conn.host(node.name))
                _, out, _ = shell(_status_script(prefix, node.private_address, lab))
                _, facts_out, _ = shell(runtimes.facts_script(prefix, node.private_address))
                replication_roles = replication.role_summary(shell, node.name, prefix, node.private_address)
        except DeployError as exc:
            rows.append(NodeStatus(node.name, node.address, False, exc.message))
            continue
        sec = _sections(out)
        facts = runtimes.parse_facts(facts_out)
        roles: dict[str, str] = {}
        if facts.mariadb_read_only is not None:
            roles["mariadb"] = "replica" if facts.mariadb_read_only else "primary"
        if facts.redis_role:
            roles["redis"] = facts.redis_role
        roles.update(replication_roles)  # role with replication lag, GTID and semi-sync (payctl.replication)
        if lab:
            programs = tuple(parse_supervisor_status(sec.get("programs", "")))
        else:
            programs = tuple(
                ProgramStatus(ln.split()[0], ln.split()[1] if len(ln.split()) > 1 else "?", None, "")
                for ln in sec.get("programs", "").splitlines()
                if ln.strip()
            )
        versions = {}
        for line in sec.get("versions", "").splitlines():
            k, _, v = line.partition("=")
            if v.strip():
                versions[k] = v.strip()
        health = sec.get("health", "").strip()
        try:
            doc = json.loads(health)
            health = str(doc.get("status", health)) if isinstance(doc, dict) else health
        except ValueError:
            health = "down" if health else ""
        rows.append(NodeStatus(node.name, node.address, True, "", programs, roles, health, versions))
    return rows


def _program(component: str) -> str:
    return component if component.startswith("payctl-") else f"payctl-{component}"


def logs(
    inv: Inventory,
    home: Path,
    lab: bool,
    *,
    node: str | None,
    component: str | None,
    lines: int = 50,
    follow: bool = False,
    poll_s: float = 1.0,
    max_polls: int | None = None,
) -> Iterator[tuple[str, str]]:
    """(node, text) chunks of the components' logs; with ``follow`` keeps polling until interrupted."""
    names = [n.name for n in inv.nodes]
    if node is not None and node not in names:
        raise ConfigError(f"no node named {node!r} in the inventory", hint=f"nodes: {', '.join(names)}")
    chosen = [node] if node else names
    with hosts.connect(inv, home, nodes=chosen) as conn:
        offsets: dict[tuple[str, str], int] = {}
        cursors: dict[tuple[str, str], str] = {}  # systemd nodes: journal cursor of the last line shown
        polls = 0
        while True:
            for n in chosen:
                prefix = inv.node_prefix(n)
                shell = shell_of(conn.host(n))
                files = _log_files(shell, prefix, component, lab)
                for f in files:
                    key = (n, f)
                    if not lab:
                        ok, out, _ = shell(journal_command(f, lines, cursors.get(key)))
                        if not ok:
                            continue
                        body, cursor = split_cursor(out)
                        cursors[key] = cursor or cursors.get(key, "")
                        if body:
                            yield n, body
                        continue
                    first = key not in offsets
                    q = shlex.quote(f)
                    ok, out, _ = shell(
                        f"tail -n {lines} {q}; wc -c < {q}"
                        if first
                        else f"tail -c +{offsets[key] + 1} {q}; wc -c < {q}"
                    )
                    if not ok:
                        continue
                    body, _, size = out.rstrip("\n").rpartition("\n")
                    offsets[key] = int(size) if size.strip().isdigit() else offsets.get(key, 0)
                    if body:
                        yield n, (f"==> {Path(f).name} <==\n" if first else "") + body
            polls += 1
            if not follow or (max_polls is not None and polls >= max_polls):
                return
            time.sleep(poll_s)


def journal_command(unit: str, lines: int, cursor: str | None) -> str:
    """journalctl for one unit: the last ``lines`` lines the first time, then only what follows ``cursor``; the
    cursor of the last entry is printed last (``--show-cursor``) so the next poll continues from there."""
    where = f"--after-cursor={shlex.quote(cursor)}" if cursor else f"-n {int(lines)}"
    return f"journalctl -u {shlex.quote(unit)} {where} --no-pager --show-cursor -o short-iso"


def split_cursor(out: str) -> tuple[str, str]:
    """(log text, cursor) from journalctl --show-cursor output (no cursor line: no entries, cursor "")."""
    body, sep, tail = out.rstrip("\n").rpartition("-- cursor: ")
    if not sep:
        return out.rstrip("\n") if "-- No entries --" not in out else "", ""
    return body.rstrip("\n"), tail.strip()


def _log_files(shell: lock.Shell, prefix: str, component: str | None, lab: bool) -> list[str]:
    if not lab:
        units = [_program(component)] if component else ["payctl-*"]
        return units
    pattern = f"{_program(component)}.log" if component else "payctl-*.log"
    _, out, _ = shell(f"ls -1 {shlex.quote(prefix)}/logs/{pattern} 2>/dev/null")
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


@dataclass(frozen=True)
class DownResult:
    stopped: dict[str, bool]
    purged: bool


def down(inv: Inventory, inventory_path: Path, home: Path, lab: bool, *, purge_data: bool, command: str) -> DownResult:
    """Stop every program of the deployment (and the supervisor); with ``purge_data`` delete data and markers."""
    started = time.monotonic()
    prefixes = {n.name: inv.node_prefix(n.name) for n in inv.nodes}
    stopped: dict[str, bool] = {}
    with hosts.connect(inv, home) as conn:
        with hosts.node_shells(inv, home, conn=conn) as open_shell:  # connected to every node: no own connection
            held = lock.take([(n, prefixes[n]) for n in prefixes], open_shell, lock.new_info(inv.deployment, command))
        error = ""
        try:
            for node, host in conn.hosts.items():
                shell = shell_of(host)
                p = shlex.quote(prefixes[node])
                if lab:
                    cmd = (
                        f'pid=$(cat {p}/run/supervisord.pid 2>/dev/null) && kill -0 "$pid" 2>/dev/null || exit 0; '
                        f"supervisorctl -c {_supervisor_conf(prefixes[node])} shutdown >/dev/null; "
                        f'for i in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done; '
                        "echo 'supervisord did not stop within 60s' >&2; exit 1"
                    )
                else:
                    cmd = "systemctl stop 'payctl-*'"
                ok, out, err = shell(cmd)
                if not ok:
                    raise DeployError(f"{node}: stopping the deployment failed: {err.strip() or out.strip()}")
                stopped[node] = True
                if purge_data:
                    ok, out, err = shell(
                        f"rm -rf {p}/data {p}/venv {p}/current {p}/releases {p}/wheelhouse {p}/kafka/lib "
                        f"{p}/payctl/deployment.json {p}/payctl/users.applied {p}/payctl/migrated"
                    )
                    if not ok:
                        raise DeployError(f"{node}: purging data failed: {err.strip() or out.strip()}")
        except DeployError as exc:
            error = exc.message
            raise
        finally:
            record = audit.AuditRecord(
                deployment=inv.deployment, command=command, phase=None, inventory=str(inventory_path),
                inventory_sha256=audit.inventory_hash(inventory_path) if inventory_path.is_file() else "",
                nodes=tuple(conn.hosts), result="failed" if error else "ok", error=error,
                duration_s=round(time.monotonic() - started, 2),
            )  # fmt: skip
            line = record.line(conn.redact)
            audit.append_local(home, record, conn.redact)
            for node, host in conn.hosts.items():
                shell_of(host)(audit.append_command(prefixes[node], line))
            lock.give_back(held)
    return DownResult(stopped, purge_data)
