"""Rendered files + node facts -> pyinfra operations, per runtime. No printing, no prompting, nothing executed here.

Three builders share one shape (``build(ctx) -> NodeWork``):

* ``lab``: native runtime on a lab host. Components run under a supervisord per node, started over SSH so it (and
  every program it starts) inherits the node's cgroup, with every config, datadir, log, socket and pid file under the
  node's prefix.
* ``systemd``: native runtime on VMs: the same programs as systemd units (apt packages, Debian's own services stopped
  and disabled, units with limits, ``systemd.service`` operations). Exercised with --dry-run here (no systemd).
* ``compose``: Docker Compose on VMs; dry-run only here (no Docker engine).

Idempotence is built from operations that compare before acting (``files.put`` compares checksums and modes,
``files.directory``, ``apt.packages``) and from facts gathered before the operations are added: a command
(``server.shell``) is added only when a fact or a changed file says it is needed, because pyinfra counts every
emitted command as a change. Large artefacts (the payapp wheelhouse, the Kafka jars) are gated by a manifest file:
when the manifest on the node matches, none of their files is even checked.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyinfra.operations import apt, files, server, systemd

from payctl import components, releases, wheelhouse
from payctl.hosts import Connected
from payctl.plan import NodePlan, Plan
from payctl.render import RenderedFile, kafka_cluster_id
from payctl.wheelhouse import MANIFEST, Wheelhouse

LAB_PACKAGES = ("mariadb-server", "mariadb-backup", "redis-server", "nginx-light", "supervisor", "python3-venv")
VM_PACKAGES = ("mariadb-server", "mariadb-backup", "redis-server", "redis-sentinel", "nginx-light", "python3-venv")
MONITORING_PACKAGES = (
    "prometheus", "prometheus-node-exporter", "prometheus-mysqld-exporter", "prometheus-redis-exporter",
    "prometheus-nginx-exporter",
)  # fmt: skip
JRE = "openjdk-17-jre-headless"
DOCKER_APT_LINE = (
    "deb [signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian bookworm stable"
)
#: The rendered firewall and the node-side record of the last one loaded (its sha256).
FIREWALL_FILE = "nftables.conf"
FIREWALL_APPLIED = "payctl/firewall.applied"
#: Services Debian starts on install: they would hold our ports, so on VMs they are stopped and disabled.
DEBIAN_SERVICES = ("mariadb", "redis-server", "redis-sentinel", "nginx", "prometheus", "prometheus-node-exporter",
                   "prometheus-mysqld-exporter", "prometheus-redis-exporter", "prometheus-nginx-exporter")  # fmt: skip


@dataclass(frozen=True)
class NodeFacts:
    """What payctl learned from a node before planning (empty on the fake connector)."""

    python: str = ""
    mariadb_initialised: bool = False
    kafka_formatted: bool = False
    marker: str = ""  # <prefix>/payctl/deployment.json: the deployment and its secrets fingerprint
    release_manifest: str = ""  # sha256 of the manifest the current release was installed from
    release_ok: bool = False  # <prefix>/current/bin/payapp exists
    release_current: str = ""  # the release ``current`` points at (payctl.releases)
    releases: tuple[str, ...] = ()  # complete releases on the node, as listed
    supervisord_pid: int | None = None
    sentinel_conf: bool = False
    mariadb_read_only: bool | None = None
    redis_role: str = ""
    bundles: Mapping[str, str] = field(default_factory=dict)  # remote dir -> sha256 of its manifest ("" absent)
    users_applied: str = ""  # sha256 of the users.sql last applied successfully
    migrated: str = ""  # sha256 of the wheelhouse manifest whose migrations ran successfully
    firewall: str = ""  # sha256 of the nftables.conf last loaded, when its table is still loaded
    pending: tuple[str, ...] = ()  # files an interrupted apply wrote whose restarts/reloads did not run (PENDING)

    @property
    def live(self) -> bool:
        """The node already runs (or ran) this deployment: its secrets are on it."""
        return bool(self.marker) or self.mariadb_initialised


def facts_script(prefix: str, private_address: str) -> str:
    """One read-only shell script printing ``key=value`` lines (parsed by ``parse_facts``)."""
    p = shlex.quote(prefix)
    return f"""P={p}
echo "python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
[ -d "$P/data/mariadb/mysql" ] && echo mariadb_initialised=1
[ -f "$P/data/kafka/meta.properties" ] && echo kafka_formatted=1
[ -f "$P/payctl/deployment.json" ] && echo "marker=$(tr -d '\\n' < "$P/payctl/deployment.json")"
{releases.facts_lines()}[ -f "$P/redis/sentinel.conf" ] && echo sentinel_conf=1
for b in wheelhouse kafka/lib; do
  [ -f "$P/$b/MANIFEST.sha256" ] && echo "bundle:$b=$(sha256sum < "$P/$b/MANIFEST.sha256" | cut -c1-64)"
done
[ -f "$P/payctl/users.applied" ] && echo "users_applied=$(cat "$P/payctl/users.applied")"
[ -f "$P/payctl/migrated" ] && echo "migrated=$(cat "$P/payctl/migrated")"
[ -f "$P/{PENDING}" ] && echo "pending=$(tr '\\n' ',' < "$P/{PENDING}")"
[ -f "$P/{FIREWALL_APPLIED}" ] && nft list table inet payctl >/dev/null 2>&1 && \
  echo "firewall=$(cat "$P/{FIREWALL_APPLIED}")"
pid=$(cat "$P/run/supervisord.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo "supervisord=$pid"
if [ -S "$P/run/mariadb.sock" ]; then
  ro=$(mariadb --socket="$P/run/mariadb.sock" -uroot -N -e 'SELECT @@read_only' 2>/dev/null) && echo "mariadb_ro=$ro"
fi
if [ -f "$P/redis/redis.conf" ]; then
  pw=$(sed -n 's/^user app on >\\([^ ]*\\) .*/\\1/p' "$P/redis/redis.conf")
  role=$(REDISCLI_AUTH="$pw" timeout 3 redis-cli --no-auth-warning --user app -h {private_address} -p 6379 \\
    INFO replication 2>/dev/null | sed -n 's/^role:\\([a-z]*\\).*/\\1/p')
  [ -n "$role" ] && echo "redis_role=$role"
fi
exit 0
"""


def parse_facts(text: str) -> NodeFacts:
    kv: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            kv[key.strip()] = value.strip()
    pid = kv.get("supervisord", "")
    ro = kv.get("mariadb_ro")
    return NodeFacts(
        python=kv.get("python", ""),
        mariadb_initialised=kv.get("mariadb_initialised") == "1",
        kafka_formatted=kv.get("kafka_formatted") == "1",
        marker=kv.get("marker", ""),
        release_manifest=kv.get("release_manifest", ""),
        release_ok=kv.get("release_ok") == "1",
        release_current=kv.get("release_current", ""),
        releases=tuple(r for r in kv.get("releases", "").split(",") if r),
        supervisord_pid=int(pid) if pid.isdigit() else None,
        sentinel_conf=kv.get("sentinel_conf") == "1",
        mariadb_read_only=None if ro not in ("0", "1") else ro == "1",
        redis_role=kv.get("redis_role", ""),
        bundles={k.removeprefix("bundle:"): v for k, v in kv.items() if k.startswith("bundle:")},
        users_applied=kv.get("users_applied", ""),
        migrated=kv.get("migrated", ""),
        firewall=kv.get("firewall", ""),
        pending=tuple(x for x in kv.get("pending", "").split(",") if x),
    )


@dataclass
class NodeWork:
    """What the operations added for one node will do (the preview shows it; the audit records it)."""

    node: str
    files: list[str] = field(default_factory=list)  # rendered paths that will change
    new_files: list[str] = field(default_factory=list)
    artefacts: list[str] = field(default_factory=list)  # current (the payapp release), kafka/lib
    packages: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    reload: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # one-off steps: init datadir, migrate, start supervisord
    #: app programs restarted after the operations, one node at a time with the node out of the LB
    #: (``payctl.rolling.restart_behind_lb``); with ``rolling_update`` supervisord.conf changed and the app groups
    #: whose sections changed are updated then too (``supervisorctl update`` restarts them).
    rolling: list[str] = field(default_factory=list)
    rolling_update: bool = False
    operations: list[str] = field(default_factory=list)  # every operation added, in order (dry-run listing)


@dataclass(frozen=True)
class BuildContext:
    conn: Connected
    plan: Plan
    node: NodePlan
    files: Mapping[str, RenderedFile]  # this node's files by path
    facts: NodeFacts
    wheelhouse: Wheelhouse | None
    kafka_lib: Path | None
    only: str | None = None
    app_source: Path | None = None
    bundle_cache: Path = Path("/tmp")
    #: absolute path -> "<sha256> <mode>" of files on the node, "dir" for directories, absent when missing
    #: (one command per node, see ``state_script``); None: unknown (fake connector) and every file is sent.
    remote: Mapping[str, str] | None = None
    #: Load the rendered firewall (inventory ``firewall.enabled``).
    firewall: bool = False
    #: The node's app is one of several LB upstreams: its app programs restart after the operations, one node at a
    #: time out of the LB (``NodeWork.rolling``), never in the operations, where every node runs at once.
    rolling_apps: bool = False


class _Ops:
    """Adds operations on one node, records each label and whether pyinfra predicts a change."""

    def __init__(self, ctx: BuildContext, work: NodeWork) -> None:
        self.ctx = ctx
        self.work = work
        self.host = ctx.conn.host(ctx.node.name)

    def add(self, label: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        metas = self.ctx.conn.add_op(op, *args, nodes=[self.ctx.node.name], name=label, **kwargs)
        meta = metas.get(self.host) if isinstance(metas, dict) else None
        change = bool(meta is not None and meta.will_change)
        self.work.operations.append(label + ("" if change else "  (no change)"))
        return change

    def shell(self, label: str, command: str) -> None:
        self.add(label, server.shell, commands=[command])


def state_script(paths: list[str]) -> str:
    """One read-only command: checksum and mode of every file, and which directories exist (``parse_state``)."""
    quoted = " ".join(shlex.quote(x) for x in paths)
    return (
        f'for f in {quoted}; do if [ -f "$f" ]; then '
        'printf \'%s %s %s\\n\' "$(sha256sum < "$f" | cut -c1-64)" "$(stat -c %a "$f")" "$f"; '
        'elif [ -d "$f" ]; then printf \'dir - %s\\n\' "$f"; fi; done; exit 0'
    )


def parse_state(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            out[parts[2]] = "dir" if parts[0] == "dir" else f"{parts[0]} {parts[1]}"
    return out


def node_paths(ctx_prefix: str, files: Mapping[str, RenderedFile], dirs: tuple[str, ...]) -> list[str]:
    """Every path whose state the builders compare before adding operations."""
    return (
        [f"{ctx_prefix}/{d}" for d in dirs]
        + [f"{ctx_prefix}/{p}" for p in sorted(files)]
        + [f"/etc/systemd/system/{components.unit_of(p)}.service" for p in sorted(files) if components.unit_of(p)]
    )


def _same(ctx: BuildContext, dest: str, text: str, mode: int) -> bool:
    return ctx.remote is not None and ctx.remote.get(dest) == f"{sha256_text(text)} {mode:o}"


def _directories(ops: _Ops, ctx: BuildContext, p: str) -> None:
    missing = [d for d in LAB_DIRS if ctx.remote is None or ctx.remote.get(f"{p}/{d}") != "dir"]
    for d in missing:
        ops.add(f"directory {d}/", files.directory, path=f"{p}/{d}", mode="700" if d.startswith("data") else "755")
    if len(missing) < len(LAB_DIRS):
        ops.work.operations.append(f"{len(LAB_DIRS) - len(missing)} directories present  (no change)")


def _prefix(ctx: BuildContext) -> str:
    return ctx.node.prefix


def _rendered_paths(ctx: BuildContext) -> list[str]:
    """The rendered files this apply handles: all of them, or ``--only`` a component's."""
    paths = sorted(ctx.files)
    if ctx.only:
        keep = set(components.files_for_component(ctx.only, paths))
        paths = [p for p in paths if p in keep]
    return paths


def _kept(ctx: BuildContext, path: str) -> bool:
    """A write-once file its running program owns now (Sentinel rewrites its own config): never written again."""
    return ctx.files[path].write_once and ctx.facts.sentinel_conf


def _put_rendered(ops: _Ops, ctx: BuildContext, dest_root: str) -> list[str]:
    """files.put for every rendered file (write-once files only when absent); returns the changed paths."""
    changed: list[str] = []
    for path in _rendered_paths(ctx):
        f = ctx.files[path]
        if _kept(ctx, path):
            ops.work.operations.append(f"keep {path} (write-once, owned by the running program)")
            continue
        dest = f"{dest_root}/{path}"
        if _same(ctx, dest, f.text, f.mode):
            ops.work.operations.append(f"write {path}  (no change)")
            continue
        if ops.add(f"write {path}", files.put, src=io.StringIO(f.text), dest=dest, mode=f"{f.mode:o}"):
            changed.append(path)
    return changed


PENDING = "payctl/pending-effects"


def _planned_changes(ctx: BuildContext, dest_root: str) -> list[str]:
    """The rendered files ``_put_rendered`` will write (same rules), known before any operation runs."""
    return [
        path for path in _rendered_paths(ctx)
        if not _kept(ctx, path) and not _same(ctx, f"{dest_root}/{path}", ctx.files[path].text, ctx.files[path].mode)
    ]  # fmt: skip


def _record_pending(ops: _Ops, ctx: BuildContext, p: str, planned: list[str]) -> list[str]:
    """Before writing files, record them on the node: an apply interrupted between a file's write and the restart
    of its reader (Ctrl-C, a lost SSH session) leaves the file in place, so the next apply would find nothing changed
    and never restart it. That apply reads the record back (``NodeFacts.pending``) and runs the effects then; the
    record is cleared once they ran (``_clear_pending``). Returns the files carried over from an earlier apply."""
    carried = [x for x in ctx.facts.pending if x not in planned and x in ctx.files]
    if planned:
        text = "".join(f"{x}\n" for x in sorted({*ctx.facts.pending, *planned}))
        ops.add("record the files whose restarts are pending", files.put, src=io.StringIO(text),
                dest=f"{p}/{PENDING}", mode="600")  # fmt: skip
    if carried:
        ops.work.actions.append(f"restarts pending from an interrupted apply: {', '.join(carried)}")
    return carried


def _clear_pending(ops: _Ops, ctx: BuildContext, p: str, planned: list[str]) -> None:
    if planned or ctx.facts.pending:
        ops.shell("clear the pending restarts (they ran)", f"rm -f {shlex.quote(p + '/' + PENDING)}")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bundle_tar(local: list[Path], manifest: str, cache: Path) -> Path:
    """One uncompressed tar of the files plus their manifest, cached by the manifest's hash (built once)."""
    path = cache / f"{sha256_text(manifest)[:16]}.tar"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for f in local:
            tar.add(f, arcname=f.name)
        info = tarfile.TarInfo(MANIFEST)
        data = manifest.encode()
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def _sync_bundle(ops: _Ops, label: str, local: list[Path], manifest: str, prefix: str, rel: str) -> bool:
    """Ship a set of files as one tar, gated by its manifest: when the node's manifest matches, nothing is sent.

    The tar is unpacked next to the target and swapped in whole (stale files go with the old directory), and the
    manifest arrives with it, so an upload that died half-way is simply redone by the next apply.
    """
    remote_dir = f"{prefix}/{rel}"
    if ops.ctx.facts.bundles.get(rel) == sha256_text(manifest):
        ops.work.operations.append(f"{label}: manifest matches  (no change)")
        return False
    tar = bundle_tar(local, manifest, ops.ctx.bundle_cache)
    upload = bundle_upload_path(prefix, rel)
    ops.add(f"{label}: upload {len(local)} files as one tar", files.put, src=str(tar), dest=upload, mode="600",
            add_deploy_dir=False)  # fmt: skip
    ops.shell(f"{label}: unpack into {rel}/", unpack_command(upload, remote_dir))
    return True


def bundle_upload_path(prefix: str, rel: str) -> str:
    return f"{prefix}/payctl/{rel.replace('/', '-')}.tar"


def unpack_command(upload: str, remote_dir: str) -> str:
    """Unpack an uploaded bundle tar next to ``remote_dir`` and swap it in whole; the tar is removed."""
    q = shlex.quote
    new, old = q(remote_dir + ".new"), q(remote_dir + ".old")
    return (
        f"set -e; rm -rf {new} {old}; mkdir -p {new}; tar -xf {q(upload)} -C {new}; "
        f"if [ -d {q(remote_dir)} ]; then mv {q(remote_dir)} {old}; fi; "
        f"mv {new} {q(remote_dir)}; rm -rf {old} {q(upload)}"
    )


def _kafka_manifest(lib: Path) -> tuple[list[Path], str]:
    jars = sorted(lib.glob("*.jar"))
    text = "".join(f"{hashlib.sha256(j.read_bytes()).hexdigest()}  {j.name}\n" for j in jars)
    return jars, text


def _install_app(ops: _Ops, ctx: BuildContext, python: str = "python3") -> bool:
    """Wheelhouse to the node, then a new release (``payctl.releases``) installed from it with ``pip --no-index``,
    ``current`` switched to it and old releases pruned; True when a release was installed (the app programs restart).

    Nothing is installed when ``current`` already holds exactly this wheelhouse: a re-apply adds no release."""
    house = ctx.wheelhouse
    if house is None or (ctx.node.app is None and ctx.node.relay is None and ctx.node.consumer is None):
        return False
    p = _prefix(ctx)
    # The release, not the wheelhouse directory, is what runs: after `payctl upgrade` + `rollback` the node's
    # wheelhouse may hold another build while current is exactly this one, and then there is nothing to do.
    if ctx.facts.release_ok and ctx.facts.release_manifest == sha256_text(house.manifest):
        ops.work.operations.append(f"payapp release {ctx.facts.release_current} is current  (no change)")
        return False
    _sync_bundle(ops, "wheelhouse", list(house.wheels), house.manifest, p, "wheelhouse")
    name = releases.next_name(ctx.facts.releases, house.key)
    kept = releases.keep([*ctx.facts.releases, name], name)
    ops.shell(
        f"install payapp release {name} (pip --no-index), switch current to it",
        f"{releases.install_command(p, name, f'{p}/wheelhouse', python)} && {releases.switch_command(p, name)} && "
        f"{releases.prune_command(p, kept)}",
    )
    ops.work.artefacts.append(components.RELEASE)
    ops.work.actions.append(f"install payapp release {name} from the wheelhouse ({len(house.wheels)} wheels), "
                            f"current -> releases/{name} (keeps {', '.join(kept[:-1]) or 'no older release'})")
    return True


def _kafka_steps(ops: _Ops, ctx: BuildContext, changed: list[str]) -> None:
    k = ctx.node.kafka
    if k is None or ctx.kafka_lib is None:
        return
    p = _prefix(ctx)
    jars, manifest = _kafka_manifest(ctx.kafka_lib)
    if _sync_bundle(ops, "kafka jars", jars, manifest, p, "kafka/lib"):
        ops.work.artefacts.append(components.KAFKA_LIB)
    if ctx.facts.kafka_formatted:
        return
    props = "server" if "broker" in k.process_roles else "controller"
    first = ctx.plan.topology.kafka_controllers[:1] == (ctx.node.name,)
    mode = "--standalone" if first else "--no-initial-controllers"
    q = shlex.quote
    ops.shell(
        "format Kafka storage (once)",
        f"java -Xmx128m -XX:TieredStopAtLevel=1 -cp {q(p + '/kafka/lib')}/'*' kafka.tools.StorageTool format "
        f"--ignore-formatted -t {kafka_cluster_id(ctx.plan.deployment)} {mode} -c {q(f'{p}/kafka/{props}.properties')}"
        f" >> {q(p + '/logs/kafka-format.log')} 2>&1",
    )
    ops.work.actions.append("format Kafka storage (KRaft, once)")


def _firewall(ops: _Ops, ctx: BuildContext) -> None:
    """Load the node's nftables file when the inventory asks for it and the loaded one differs (or is gone).

    ``nft -f`` applies the whole file as one transaction (the file deletes and recreates only ``table inet
    payctl``), so established sessions, SSH included, carry on and a refused file changes nothing. Runs right after
    the files are written, before any program starts, so a service never listens unprotected.
    """
    f = ctx.files.get(FIREWALL_FILE)
    if not ctx.firewall or f is None:
        return
    if ctx.only and FIREWALL_FILE not in components.files_for_component(ctx.only, [FIREWALL_FILE]):
        return
    want = sha256_text(f.text)
    if ctx.facts.firewall == want:
        ops.work.operations.append("firewall loaded (table inet payctl)  (no change)")
        return
    ops.shell(
        "load the firewall (nft -f nftables.conf: table inet payctl)", firewall_load_command(_prefix(ctx), f.text)
    )
    ops.work.actions.append("load the firewall (nft -f nftables.conf)")


def firewall_load_command(prefix: str, text: str) -> str:
    """Load ``<prefix>/nftables.conf`` (whose content is ``text``) and record it as the loaded one."""
    q = shlex.quote
    loaded = q(prefix + "/" + FIREWALL_APPLIED)
    return f"nft -f {q(prefix + '/' + FIREWALL_FILE)} && echo {sha256_text(text)} > {loaded}"


def _marker(ops: _Ops, ctx: BuildContext, marker_text: str) -> None:
    ops.add("record the deployment on the node", files.put, src=io.StringIO(marker_text),
            dest=f"{_prefix(ctx)}/payctl/deployment.json", mode="600")  # fmt: skip


# --------------------------------------------------------------------------------------------------- lab

LAB_DIRS = (
    "mariadb", "redis", "kafka", "nginx", "nginx/logs", "nginx/run", "nginx/tmp", "supervisor", "logs", "run", "payctl",
    "data", "data/mariadb", "data/redis", "data/kafka", "data/sentinel", "data/prometheus",
)  # fmt: skip


def build_lab(ctx: BuildContext, marker_text: str) -> NodeWork:
    """Operations for one lab host (supervisord in the node's namespace and cgroup, all under its prefix)."""
    work = NodeWork(ctx.node.name)
    ops = _Ops(ctx, work)
    p = _prefix(ctx)
    q = shlex.quote
    conf = f"{p}/supervisor/supervisord.conf"
    ctl = f"supervisorctl -c {q(conf)}"
    _directories(ops, ctx, p)
    pkgs = list(LAB_PACKAGES) + ([JRE] if ctx.node.kafka is not None else []) + (["nftables"] if ctx.firewall else [])
    if ctx.node.prometheus is not None:
        pkgs += list(MONITORING_PACKAGES)
    if ops.add("system packages", apt.packages, packages=pkgs, update=False):
        work.packages += pkgs
    planned = _planned_changes(ctx, p)
    carried = _record_pending(ops, ctx, p, planned)
    changed = _put_rendered(ops, ctx, p)
    work.files += changed
    effective = [*changed, *carried]  # what readers must see: written now, or by an apply that was cut short
    _firewall(ops, ctx)
    _kafka_steps(ops, ctx, changed)
    installed = _install_app(ops, ctx)
    initialised = False
    if ctx.node.mariadb is not None and not ctx.facts.mariadb_initialised:
        ops.shell(
            "initialise the MariaDB datadir (once)",
            f"mariadb-install-db --no-defaults --datadir={q(p + '/data/mariadb')} --user=root --skip-test-db "
            f"--auth-root-authentication-method=socket > {q(p + '/logs/mariadb-install.log')} 2>&1",
        )
        work.actions.append("initialise the MariaDB datadir (mariadb-install-db, once)")
        initialised = True
    _marker(ops, ctx, marker_text)
    programs = components.supervisor_programs(ctx.files["supervisor/supervisord.conf"].text)
    started = ctx.facts.supervisord_pid is None
    if started:
        ops.shell(
            "start supervisord (inside the node's namespace and cgroup)",
            f"cd {q(p)} && setsid supervisord -c {q(conf)} < /dev/null >> {q(p + '/logs/supervisord.out')} 2>&1 & "
            f"for i in $(seq 1 100); do [ -S {q(p + '/run/supervisor.sock')} ] && exit 0; sleep 0.1; done; "
            "echo 'supervisord did not open its socket within 10s' >&2; exit 1",
        )
        work.actions.append(f"start supervisord with {len(programs)} programs")
    elif "supervisor/supervisord.conf" in effective and ctx.rolling_apps:
        ops.shell("supervisor: reread and update changed programs but the app's",
                  supervisor_update_cmd(ctl, components.APP_PROGRAMS))  # fmt: skip
        work.actions.append("supervisorctl update (programs whose section changed restart; the app's later, out of "
                            "the LB)")  # fmt: skip
        work.rolling_update = True
    elif "supervisor/supervisord.conf" in effective:
        ops.shell("supervisor: reread and update changed programs", f"{ctl} reread && {ctl} update")
        work.actions.append("supervisorctl update (programs whose section changed restart)")
    migrate = _users_and_migrate(ops, ctx, changed, initialised=initialised, installed=installed)
    if started:
        # Programs started with supervisord before the users/schema existed may have given up: start them now.
        app_programs = [x for x in programs if x in components.APP_PROGRAMS]
        if app_programs:
            ops.shell("start the app programs now that the schema exists", _restart_cmd(ctl, app_programs))
        _clear_pending(ops, ctx, p, planned)
        return work
    fx = components.effects([*effective, *work.artefacts], programs)
    restart = list(fx.restart)
    if migrate:
        restart += [x for x in programs if x in components.APP_PROGRAMS and x not in restart]
    if ctx.rolling_apps:
        work.rolling += [x for x in restart if x in components.APP_PROGRAMS]
        restart = [x for x in restart if x not in work.rolling]
    if restart:
        ops.shell(f"restart {', '.join(restart)}", _restart_cmd(ctl, restart))
        work.restart += restart
    for prog in fx.reload:
        ops.shell(f"reload {prog} (SIGHUP)", f"{ctl} signal HUP {q(prog)}")
        work.reload.append(prog)
    if not (work.rolling or work.rolling_update):  # else cleared once the rolling restart ran
        _clear_pending(ops, ctx, p, planned)
    return work


def _users_and_migrate(ops: _Ops, ctx: BuildContext, changed: list[str], *, initialised: bool, installed: bool) -> bool:
    """Users from the 0600 SQL file (on stdin, never argv) until applied; migrations once per payapp build.

    Each step records its success on the node (``payctl/users.applied``, ``payctl/migrated``) and is retried by the
    next apply until it has succeeded. Returns whether migrations run (the app programs then restart).
    """
    p = _prefix(ctx)
    q = shlex.quote
    work = ops.work
    sql = ctx.files.get("mariadb/users.sql")
    primary = ctx.node.mariadb is not None and ctx.node.mariadb.role == "primary"
    if primary and sql is not None and (initialised or ctx.facts.users_applied != sha256_text(sql.text)):
        sock = q(p + "/run/mariadb.sock")
        ops.shell(
            "create the database and users (SQL from a 0600 file, on stdin)",
            f"for i in $(seq 1 240); do mariadb-admin --socket={sock} -uroot ping >/dev/null 2>&1 && break; "
            f"sleep 0.25; done; mariadb --socket={sock} -uroot < {q(p + '/mariadb/users.sql')} && "
            f"echo {sha256_text(sql.text)} > {q(p + '/payctl/users.applied')}",
        )
        work.actions.append("apply mariadb/users.sql (database, app and migrate users)")
    want = sha256_text(ctx.wheelhouse.manifest) if ctx.wheelhouse is not None else ""
    migrate = primary and ctx.node.app is not None and (initialised or installed or ctx.facts.migrated != want)
    if migrate:
        ops.shell(
            "run migrations (payapp migrate)",
            f"{q(p)}/{releases.CURRENT}/bin/payapp migrate --env-file {q(p + '/app.env')} && "
            f"echo {want} > {q(p + '/payctl/migrated')}",
        )
        work.actions.append("payapp migrate")
    return migrate


def supervisor_update_cmd(ctl: str, keep: tuple[str, ...]) -> str:
    """``supervisorctl reread``, then ``update`` of the groups it reports changed, available (added) or disappeared,
    all but those in ``keep`` (their update is left to the rolling restart). Prints ``UPDATED: <groups>``."""
    select = " ".join(f"-e {shlex.quote(g)}" for g in keep)
    return (
        f"out=$({ctl} reread 2>&1); case \"$out\" in *ERROR*) echo \"$out\" >&2; exit 1;; esac; "
        f"g=$(printf '%s\\n' \"$out\" | sed -n 's/^\\([^: ]*\\): \\(changed\\|available\\|disappeared\\)$/\\1/p' "
        f"| grep -xvF {select} | tr '\\n' ' '); "
        f'[ -z "$g" ] || {ctl} update $g; echo "UPDATED: $g"'
    )


def _restart_cmd(ctl: str, programs: list[str]) -> str:
    """Stop (if running) then start: also recovers programs in FATAL/BACKOFF, which `restart` reports as errors."""
    names = " ".join(shlex.quote(x) for x in programs)
    return f"{ctl} stop {names} >/dev/null 2>&1; {ctl} start {names}"


# --------------------------------------------------------------------------------------------------- systemd (VMs)


def build_systemd(ctx: BuildContext, marker_text: str) -> NodeWork:
    """Native runtime on a VM: packages, Debian's services off, units from the plan, restarts of what changed."""
    work = NodeWork(ctx.node.name)
    ops = _Ops(ctx, work)
    p = _prefix(ctx)
    q = shlex.quote
    pkgs = list(VM_PACKAGES) + ([JRE] if ctx.node.kafka is not None else []) + (["nftables"] if ctx.firewall else [])
    if ctx.node.prometheus is not None:
        pkgs += list(MONITORING_PACKAGES)
    if ops.add("system packages", apt.packages, packages=pkgs, update=True, cache_time=3600):
        work.packages += pkgs
    for svc in DEBIAN_SERVICES:
        if svc.split("-")[0] in {"prometheus"} and ctx.node.prometheus is None:
            continue
        ops.add(f"stop and disable Debian's {svc}", systemd.service, service=svc, running=False, enabled=False)
    _directories(ops, ctx, p)
    if ctx.node.mariadb is not None:  # mariadbd drops to the mysql user on VMs (--user=mysql)
        ops.add("data/mariadb/ owned by mysql", files.directory, path=f"{p}/data/mariadb", user="mysql",
                group="mysql", mode="700")  # fmt: skip
    rendered = {k: v for k, v in ctx.files.items() if not k.startswith("systemd/")}
    units = {k: v for k, v in ctx.files.items() if k.startswith("systemd/")}
    planned = _planned_changes(replace(ctx, files=rendered), p)
    carried = _record_pending(ops, ctx, p, planned)
    changed = _put_rendered(ops, replace(ctx, files=rendered), p)
    work.files += changed
    _firewall(ops, ctx)
    unit_changed = []
    for path, f in sorted(units.items()):
        name = components.unit_of(path)
        dest = f"/etc/systemd/system/{name}.service"
        if _same(ctx, dest, f.text, 0o644):
            continue
        if ops.add(f"unit {name}", files.put, src=io.StringIO(f.text), dest=dest,
                   mode="644"):  # fmt: skip
            unit_changed.append(path)
    work.files += unit_changed
    _kafka_steps(ops, ctx, changed)
    installed = _install_app(ops, ctx)
    if ctx.node.mariadb is not None and not ctx.facts.mariadb_initialised:
        ops.shell("initialise the MariaDB datadir (once)",
                  f"mariadb-install-db --no-defaults --datadir={q(p + '/data/mariadb')} --user=mysql --skip-test-db "
                  f"--auth-root-authentication-method=socket")  # fmt: skip
        work.actions.append("initialise the MariaDB datadir (once)")
    _marker(ops, ctx, marker_text)
    programs = [n for n in (components.unit_of(u) for u in sorted(units)) if n]
    fx = components.effects([*changed, *carried, *unit_changed, *work.artefacts], programs)
    if "payctl-mariadb" in programs:
        ops.add(
            "systemd payctl-mariadb",
            systemd.service,
            service="payctl-mariadb",
            running=True,
            enabled=True,
            restarted="payctl-mariadb" in fx.restart,
            daemon_reload=bool(unit_changed),
        )
    _users_and_migrate(ops, ctx, changed, initialised=not ctx.facts.mariadb_initialised, installed=installed)
    _backup_timer(ops, ctx)
    for name in programs:
        restart = name in fx.restart
        rolling = restart and ctx.rolling_apps and name in components.APP_PROGRAMS
        ops.add(f"systemd {name}", systemd.service, service=name, running=True, enabled=True,
                restarted=restart and not rolling, reloaded=name in fx.reload,
                daemon_reload=bool(unit_changed))  # fmt: skip
        if rolling:
            work.rolling.append(name)
        elif restart:
            work.restart.append(name)
    if not work.rolling:  # else cleared once the rolling restart ran
        _clear_pending(ops, ctx, p, planned)
    return work


def _backup_timer(ops: _Ops, ctx: BuildContext) -> None:
    """The daily backup on a VM: its oneshot service and timer (rendered under mariadb/) installed and the timer on."""
    units = [f"payctl-backup.{kind}" for kind in ("service", "timer") if f"mariadb/payctl-backup.{kind}" in ctx.files]
    if len(units) != 2:
        return
    changed = False
    for unit in units:
        f = ctx.files[f"mariadb/{unit}"]
        dest = f"/etc/systemd/system/{unit}"
        if not _same(ctx, dest, f.text, 0o644):
            changed = ops.add(f"unit {unit}", files.put, src=io.StringIO(f.text), dest=dest, mode="644") or changed
    ops.add("systemd payctl-backup.timer (daily backup)", systemd.service, service="payctl-backup.timer",
            running=True, enabled=True, daemon_reload=changed)  # fmt: skip


# --------------------------------------------------------------------------------------------------- compose (VMs)


def _compose_jmx_agent(ops: _Ops, ctx: BuildContext, p: str) -> None:
    """The Kafka container's JMX exporter agent (KAFKA_OPTS -javaagent, payctl.render): the jar from the local Kafka
    bundle goes next to the Kafka config the container mounts (files.put: unchanged when the node has the same)."""
    from payctl.errors import PayctlError
    from payctl.render import JMX_EXPORTER_JAR
    from payctl.sizing import broker_metrics

    if not broker_metrics(c.name for c in ctx.node.components):
        return
    jar = ctx.kafka_lib / JMX_EXPORTER_JAR if ctx.kafka_lib is not None else None
    if jar is None or not jar.is_file():
        raise PayctlError(f"the Kafka JMX exporter agent ({JMX_EXPORTER_JAR}) is missing from the Kafka jar bundle",
                          hint="run scripts/fetch-kafka (packaging/kafka/pom.xml lists it)")  # fmt: skip
    ops.add(f"Kafka JMX exporter agent kafka/{JMX_EXPORTER_JAR}", files.put, src=str(jar),
            dest=f"{p}/kafka/{JMX_EXPORTER_JAR}", mode="644", add_deploy_dir=False)  # fmt: skip


def build_compose(ctx: BuildContext, marker_text: str) -> NodeWork:
    """Docker Engine + Compose v2 from Docker's apt repository, the project files, `docker compose up -d --wait`."""
    work = NodeWork(ctx.node.name)
    ops = _Ops(ctx, work)
    p = _prefix(ctx)
    q = shlex.quote
    ops.add("Docker's apt key", files.download, src="https://download.docker.com/linux/debian/gpg",
            dest="/etc/apt/keyrings/docker.asc", mode="644")  # fmt: skip
    ops.add("Docker's apt repository", files.line, path="/etc/apt/sources.list.d/docker.list", line=DOCKER_APT_LINE)
    if ops.add(
        "Docker Engine + Compose v2",
        apt.packages,
        packages=["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"],
        update=True,
    ):
        work.packages += ["docker-ce", "docker-compose-plugin"]
    if ctx.firewall and ops.add("nftables", apt.packages, packages=["nftables"]):
        work.packages.append("nftables")
    changed = _put_rendered(ops, ctx, p)
    work.files += changed
    _firewall(ops, ctx)
    if ctx.node.app is not None and ctx.app_source is not None:
        # The image is built on the node from the payapp source (payapp/Dockerfile is rendered next to it).
        for src in wheelhouse.source_files(ctx.app_source):
            rel = src.relative_to(ctx.app_source)
            ops.add(f"payapp source {rel}", files.put, src=str(src), dest=f"{p}/payapp/{rel}", mode="644",
                    add_deploy_dir=False)  # fmt: skip
    _compose_jmx_agent(ops, ctx, p)
    _marker(ops, ctx, marker_text)
    _backup_timer(ops, ctx)
    if changed or not ctx.facts.live:
        ops.shell(
            "docker compose up -d --wait (recreates only changed services)",
            f"cd {q(p)} && docker compose -p payctl-{ctx.plan.deployment} up -d --build --wait",
        )
        work.actions.append("docker compose up -d --wait")
    return work
