"""MariaDB backups: an online, consistent mariabackup of one DB node plus its binlogs, copied off the node.

One backup is a directory ``<dir>/<ID>/`` (ID = the UTC start time, ``20261125T163000Z``: names sort by time):

    base.tar.gz       the mariabackup target directory (not prepared: ``payctl restore`` prepares a copy)
    binlogs/          the node's binlog files from the one holding the backup's position up to the last closed one
                      (``FLUSH BINARY LOGS`` right after the copy closes the file that was being written)
    manifest.json     id, times, source node and role, GTID position (``mariadb_backup_binlog_info``), binlog files,
                      sha256 and size of every file, payapp, schema and MariaDB versions

The work on the node is ONE bash script (``node_script``), the same text the scheduled daily backup runs
(``backup/backup.sh`` rendered for every DB node): mariabackup connects as the ``backup`` account (RELOAD, PROCESS,
LOCK TABLES, BINLOG MONITOR, SLAVE MONITOR; the 0600 option file ``mariadb/backup.cnf``) and a node-local ``flock``
keeps two backups from running at once. The source is a replica when the deployment has one (live roles), so the
primary's buffer pool and disk are left to payments; a replica whose SQL thread stopped is not a backup source.

Retention keeps at most ``keep`` backups and, within that, only the newest whose total size fits the plan's
``backups`` disk item (``payctl.sizing.disk_budget``); the newest backup is never deleted.

The core never prints: progress goes through ``Step`` callbacks and failures are ``BackupError``s with a hint.
Nodes are reached through ``NodeFiles`` (a command, a 0600 file, a file copied off or onto the node): SSH in a
deployment, a local shell in the tests, which run this against a real MariaDB.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from payctl.errors import PayctlError
from payctl.replication import NodeIO

ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
BINLOG_RE = re.compile(r"^[A-Za-z0-9_.-]+\.[0-9]{6}$")
GTID_RE = re.compile(r"^[0-9]+-[0-9]+-[0-9]+(,[0-9]+-[0-9]+-[0-9]+)*$")
MANIFEST = "manifest.json"
BASE = "base.tar.gz"
BACKUP_USER = "backup"
#: What mariabackup 10.11 checks for (check_all_privileges): RELOAD and PROCESS, LOCK TABLES for the backup locks,
#: BINLOG MONITOR for the binlog position and SHOW BINARY LOGS, SLAVE MONITOR for --slave-info on a replica.
BACKUP_GRANTS = "RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR, SLAVE MONITOR"
#: Daily, at 03:30 in Seoul (18:30 UTC): the quietest hour of a Korean payment service.
SCHEDULE_UTC = "18:30"
KEEP = 7  # at most a week of daily backups, fewer when the plan's disk budget is smaller
EXIT_BUSY = 75  # the node script's exit code when another backup holds the node's lock


class BackupError(PayctlError):
    """A backup or restore could not be done; the message says what, the hint what to do."""


class NodeFiles(NodeIO, Protocol):
    def fetch(self, remote: str, local: Path) -> None:
        """Copy ``remote`` (a file on the node) to ``local``."""

    def push(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` on the node (its directory exists)."""


Step = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# --------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the backup directory
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    id: str
    deployment: str
    started_at: str  # ISO-8601 UTC, when mariabackup started
    finished_at: str  # ISO-8601 UTC, after mariabackup finished: the data is consistent at a point before this
    source_node: str
    source_role: str  # primary | replica
    gtid: str  # the GTID position of the backup (mariadb_backup_binlog_info): replay starts after it
    binlog_file: str  # the source's binlog file holding that position
    binlog_pos: int
    binlogs: tuple[str, ...]
    files: tuple[FileEntry, ...]
    payapp_version: str = ""
    schema_version: str = ""
    mariadb_version: str = ""
    method: str = "mariabackup"
    format: int = 1

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def finished(self) -> datetime:
        return datetime.fromisoformat(self.finished_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["files"] = tuple(FileEntry(**f) for f in raw["files"])
        raw["binlogs"] = tuple(raw["binlogs"])
        return cls(**raw)


def new_id(now: datetime) -> str:
    """The id of a backup started at ``now`` (aware): its UTC time, second resolution."""
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_backups(directory: Path) -> list[Manifest]:
    """Every backup under ``directory`` with a readable manifest, oldest first."""
    out: list[Manifest] = []
    if not directory.is_dir():
        return out
    for d in sorted(directory.iterdir()):
        m = d / MANIFEST
        if ID_RE.match(d.name) and m.is_file():
            try:
                out.append(Manifest.from_json(m.read_text()))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def load(directory: Path, backup_id: str) -> Manifest:
    """The manifest of ``backup_id``; a clear error naming the backups there are when it is unknown."""
    path = directory / backup_id / MANIFEST
    if not ID_RE.match(backup_id) or not path.is_file():
        known = [m.id for m in list_backups(directory)]
        raise BackupError(
            f"no backup {backup_id!r} in {directory}",
            hint=(f"backups there: {', '.join(known[-5:])} (payctl backup -i INV --list)" if known else
                  "there is none: take one with `payctl backup -i INV`, or pass --from DIR where they are"),
        )  # fmt: skip
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"the manifest of backup {backup_id} is unreadable: {exc}",
                          hint=f"{path} was edited or truncated; use another backup") from None  # fmt: skip


def verify(directory: Path, manifest: Manifest) -> None:
    """Every file of the manifest is there with its size and sha256; raises naming the first that is not."""
    base = directory / manifest.id
    for f in manifest.files:
        path = base / f.name
        if not path.is_file():
            raise BackupError(f"backup {manifest.id}: {f.name} is missing",
                              hint="the backup is incomplete: use another backup (payctl backup --list)")  # fmt: skip
        got = sha256_file(path)
        if got != f.sha256 or path.stat().st_size != f.size:
            raise BackupError(
                f"backup {manifest.id}: checksum mismatch in {f.name} (manifest {f.sha256[:12]}…, file {got[:12]}…)",
                hint="the copy is damaged: restore from another backup, or copy this one again from where it was "
                "taken; nothing was restored",
            )


# --------------------------------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class Retention:
    keep: int
    budget_bytes: int  # 0: no size limit


def retention_for(backups_gb: float | None, keep: int = KEEP) -> Retention:
    """The policy from the plan's ``backups`` disk item (GB); None: the node has no such item (no size limit)."""
    return Retention(keep, int(backups_gb * 1e9) if backups_gb else 0)


def to_prune(backups: Sequence[Manifest], policy: Retention) -> list[str]:
    """Ids to delete, oldest first: beyond ``keep``, or not fitting the budget. The newest is always kept."""
    newest_first = sorted(backups, key=lambda m: m.id, reverse=True)
    kept = 0
    used = 0
    drop = []
    for i, m in enumerate(newest_first):
        fits = policy.budget_bytes == 0 or used + m.size <= policy.budget_bytes
        if i == 0 or (kept < policy.keep and fits):
            kept += 1
            used += m.size
        else:
            drop.append(m.id)
    return sorted(drop)


# --------------------------------------------------------------------------------------------------- time


def parse_until(text: str) -> datetime:
    """``--until``: ISO-8601; with an offset (``+09:00``, ``Z``) it is that instant, without one it is UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise BackupError(f"--until {text!r} is not an ISO-8601 time",
                          hint="e.g. 2026-11-25T16:42:10Z or 2026-11-26T01:42:10+09:00 (no offset: UTC)") from None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).astimezone(UTC)


def stop_datetime(until: datetime) -> str:
    """``mariadb-binlog --stop-datetime`` in UTC (run with ``TZ=UTC``): binlog timestamps are whole seconds, so the
    replay stops at the first event stamped at or after the second ``until`` falls in."""
    return until.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------------------------------- node script


@dataclass(frozen=True)
class NodeLayout:
    """Where a DB node keeps what the backup needs (absolute paths on the node)."""

    cnf: str  # 0600 option file of the backup account ([client] + [mariabackup], with datadir)
    lock: str  # the node's backup lock file
    payapp_python: str = ""  # the venv's python on an app node ("" none)


def node_script(layout: NodeLayout) -> str:
    """The bash script that backs the node up into directory ``$1`` and prints ``key=value`` facts.

    Files in ``$1``: ``base.tar.gz``, ``binlogs/*``, ``SHA256SUMS``, ``SIZES``, ``info`` (the printed facts),
    ``mariabackup.log``. Exit 75 when another backup holds the node's lock.
    """
    q = shlex.quote
    cli = f"mariadb --defaults-file={q(layout.cnf)} -N -B"
    py = q(layout.payapp_python) if layout.payapp_python else ""
    version = (f"$({py} -c 'import importlib.metadata as m; print(m.version(\"payapp\"))' 2>/dev/null || true)"
               if py else "")  # fmt: skip
    return f"""#!/bin/bash
# payctl: one online MariaDB backup of this node into directory $1 (mariabackup + the binlogs since its position).
set -euo pipefail
umask 077
OUT="$1"
exec 9>>{q(layout.lock)}
flock -n 9 || {{ echo "another backup is running on this node ({layout.lock})" >&2; exit {EXIT_BUSY}; }}
mkdir -p "$OUT"
started=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
if ! mariadb-backup --defaults-file={q(layout.cnf)} --backup --slave-info --target-dir="$OUT/base" \\
    > "$OUT/mariabackup.log" 2>&1; then
  tail -n 15 "$OUT/mariabackup.log" >&2; exit 1
fi
finished=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
# mariadb_backup_binlog_info (xtrabackup_binlog_info before MariaDB 10.11.8): file, position, GTID.
info_file="$OUT/base/mariadb_backup_binlog_info"
[ -f "$info_file" ] || info_file="$OUT/base/xtrabackup_binlog_info"
read -r bfile bpos bgtid < "$info_file"
tar -C "$OUT" -cf - base | gzip -1 > "$OUT/base.tar.gz"
rm -rf "$OUT/base"
# Close the binlog being written, so every file copied is complete; the copy starts at the backup's own file.
{cli} -e 'FLUSH BINARY LOGS'
dir=$(dirname "$({cli} -e 'SELECT @@log_bin_basename')")
mapfile -t logs < <({cli} -e 'SHOW BINARY LOGS' | cut -f1)
mkdir -p "$OUT/binlogs"
copied=""
for ((i = 0; i < ${{#logs[@]}} - 1; i++)); do
  f=${{logs[$i]}}
  [[ "$f" < "$bfile" ]] && continue
  cp "$dir/$f" "$OUT/binlogs/$f"
  copied="$copied $f"
done
cd "$OUT"
sha256sum base.tar.gz binlogs/* > SHA256SUMS
stat -c '%s %n' base.tar.gz binlogs/* > SIZES
{{
  echo "started=$started"
  echo "finished=$finished"
  echo "binlog_file=$bfile"
  echo "binlog_pos=$bpos"
  echo "gtid=$bgtid"
  echo "binlogs=${{copied# }}"
  echo "read_only=$({cli} -e 'SELECT @@read_only')"
  echo "mariadb_version=$({cli} -e 'SELECT VERSION()')"
  echo "payapp_version={version}"
}} > info
cat info
"""


def parse_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().isidentifier():
            out[key.strip()] = value.strip()
    return out


def parse_sums(sums: str, sizes: str) -> tuple[FileEntry, ...]:
    """``sha256sum`` and ``stat -c '%s %n'`` output -> entries, in the order of the sums."""
    size_of = {}
    for line in sizes.splitlines():
        n, _, name = line.strip().partition(" ")
        if n.isdigit():
            size_of[name.strip()] = int(n)
    out = []
    for line in sums.splitlines():
        digest, _, name = line.strip().partition("  ")
        if len(digest) == 64 and name:
            out.append(FileEntry(name.strip(), size_of.get(name.strip(), 0), digest))
    return tuple(out)


# --------------------------------------------------------------------------------------------------- one backup


@dataclass(frozen=True)
class Source:
    """The DB node a backup is taken from."""

    name: str
    role: str  # primary | replica
    io: NodeFiles
    layout: NodeLayout
    workdir: str  # staging directory on the node (under the node's backups directory)
    admin_client: str  # e.g. "mariadb --socket=<prefix>/run/mariadb.sock -uroot": for the schema version only


@dataclass
class BackupResult:
    manifest: Manifest
    directory: Path
    pruned: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def take(source: Source, deployment: str, directory: Path, now: datetime, retention: Retention,
         step: Step = _quiet) -> BackupResult:  # fmt: skip
    """Back ``source`` up into ``directory/<ID>/``, verify every file copied off the node, then apply retention."""
    backup_id = new_id(now)
    local = directory / backup_id
    if local.exists():
        raise BackupError(f"{local} exists already", hint="wait a second and run again (ids are UTC seconds)")
    staging = f"{source.workdir}/{backup_id}"
    q = shlex.quote
    io = source.io
    result = BackupResult(manifest=None, directory=local)  # type: ignore[arg-type]

    def note(s: str) -> None:
        result.steps.append(s)
        step(s)

    ok, out, err = io.run(f"mkdir -p {q(source.workdir)} && chmod 700 {q(source.workdir)}")
    if not ok:
        raise BackupError(f"{source.name}: cannot create {source.workdir}: {(err or out).strip()}")
    script = f"{source.workdir}/backup.sh"
    io.put_private(script, node_script(source.layout))
    note(f"mariabackup on {source.name} ({source.role}), then FLUSH BINARY LOGS and the binlogs since its position")
    try:
        ok, out, err = io.run(f"bash {q(script)} {q(staging)}")
        if not ok:
            busy = "another backup is running" in err
            raise BackupError(
                f"{source.name}: the backup failed: {(err or out).strip()[-600:]}",
                hint="wait for the running backup (the daily schedule or another payctl backup) and run again"
                if busy else "the lines above come from mariabackup on the node; fix the cause and run again",
            )  # fmt: skip
        info = parse_info(out)
        if not GTID_RE.match(info.get("gtid", "")):
            raise BackupError(f"{source.name}: the backup recorded no GTID position ({info.get('gtid')!r})",
                              hint="binlog and GTID are on from phase 1: is this a payctl MariaDB?")  # fmt: skip
        _, sums, _ = io.run(f"cat {q(staging)}/SHA256SUMS")
        _, sizes, _ = io.run(f"cat {q(staging)}/SIZES")
        files = parse_sums(sums, sizes)
        note(f"copy {len(files)} files ({sum(f.size for f in files) / 1e6:.1f} MB) off {source.name}")
        local.mkdir(parents=True, mode=0o700)
        (local / "binlogs").mkdir(mode=0o700)
        for f in files:
            io.fetch(f"{staging}/{f.name}", local / f.name)
            got = sha256_file(local / f.name)
            if got != f.sha256:
                raise BackupError(f"{f.name} changed on its way off {source.name} (sha256 {got[:12]}… != "
                                  f"{f.sha256[:12]}…)", hint="run the backup again")  # fmt: skip
        schema = _schema_version(source)
    except BaseException:
        io.run(f"rm -rf {q(staging)}")
        if local.exists():
            shutil.rmtree(local, ignore_errors=True)
        raise
    io.run(f"rm -rf {q(staging)}")
    manifest = Manifest(
        id=backup_id, deployment=deployment, started_at=info.get("started", ""),
        finished_at=info.get("finished", ""), source_node=source.name, source_role=source.role,
        gtid=info["gtid"], binlog_file=info.get("binlog_file", ""), binlog_pos=int(info.get("binlog_pos") or 0),
        binlogs=tuple(info.get("binlogs", "").split()), files=files,
        payapp_version=info.get("payapp_version", ""), schema_version=schema,
        mariadb_version=info.get("mariadb_version", ""),
    )  # fmt: skip
    (local / MANIFEST).write_text(manifest.to_json())
    result.manifest = manifest
    note(f"backup {backup_id}: GTID {manifest.gtid}, {len(manifest.binlogs)} binlog files, "
         f"{manifest.size / 1e6:.1f} MB")  # fmt: skip
    result.pruned = prune(directory, retention)
    if result.pruned:
        note(f"retention (keep {retention.keep}, budget {retention.budget_bytes / 1e9:.1f} GB): deleted "
             f"{', '.join(result.pruned)}")  # fmt: skip
    return result


def _schema_version(source: Source) -> str:
    ok, out, _ = source.io.run(
        f"{source.admin_client} -N -B -e 'SELECT COALESCE(MAX(version), 0) FROM payments.schema_migrations' "
        "2>/dev/null"
    )
    return out.strip() if ok else ""


def prune(directory: Path, retention: Retention) -> list[str]:
    """Delete the backups ``to_prune`` names; returns their ids."""
    drop = to_prune(list_backups(directory), retention)
    for backup_id in drop:
        shutil.rmtree(directory / backup_id)
    return drop


def binlogs_since_script(layout: NodeLayout, first: str) -> str:
    """Close the current binlog and list (``<size> <path>``) every closed binlog file from ``first`` on."""
    q = shlex.quote
    cli = f"mariadb --defaults-file={q(layout.cnf)} -N -B"
    return (
        f"set -euo pipefail; {cli} -e 'FLUSH BINARY LOGS'; "
        f"dir=$(dirname \"$({cli} -e 'SELECT @@log_bin_basename')\"); "
        f"mapfile -t logs < <({cli} -e 'SHOW BINARY LOGS' | cut -f1); "
        'for ((i = 0; i < ${#logs[@]} - 1; i++)); do f=${logs[$i]}; '
        f'[[ "$f" < {q(first)} ]] && continue; stat -c "%s %n" "$dir/$f"; done'
    )


def fetch_binlogs_since(source: Source, manifest: Manifest, dest: Path, step: Step = _quiet) -> list[Path]:
    """The source's binlogs written after the backup (not in it), copied into ``dest``: what a restore to a later
    point needs. The source must be the node the backup was taken from (binlog file names are per server)."""
    ok, out, err = source.io.run(f"bash -c {shlex.quote(binlogs_since_script(source.layout, manifest.binlog_file))}")
    if not ok:
        raise BackupError(f"{source.name}: listing its binlogs failed: {(err or out).strip()[-400:]}")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    got = []
    for line in out.splitlines():
        size, _, path = line.strip().partition(" ")
        name = Path(path).name
        if not size.isdigit() or not BINLOG_RE.match(name) or name in manifest.binlogs:
            continue
        source.io.fetch(path, dest / name)
        got.append(dest / name)
    step(f"{len(got)} binlog files written on {source.name} since backup {manifest.id}")
    return got


# --------------------------------------------------------------------------------------------------- the schedule


def daily_script(node_script_path: str, backups_dir: str, retention: Retention, at_utc: str = SCHEDULE_UTC) -> str:
    """The node's scheduled backup: ``once`` takes one into ``backups_dir/<ID>`` and applies retention; ``loop``
    (the lab's supervisor program; VMs use a systemd timer) runs ``once`` daily at ``at_utc``."""
    q = shlex.quote
    budget = (f' && [ $((used + size)) -le {retention.budget_bytes} ]' if retention.budget_bytes else "")
    return f"""#!/bin/bash
# payctl: daily MariaDB backup of this node into {backups_dir}/<ID>, keeping at most {retention.keep}
# within {retention.budget_bytes} bytes (0: no limit; the plan's backups disk item). The newest is always kept.
set -euo pipefail
umask 077
DIR={q(backups_dir)}

once() {{
  mkdir -p "$DIR"
  id=$(date -u +%Y%m%dT%H%M%SZ)
  bash {q(node_script_path)} "$DIR/$id" > /dev/null
  used=0
  n=0
  for d in $(ls -1d "$DIR"/[0-9]*T*Z 2>/dev/null | sort -r); do
    size=$(du -sb "$d" | cut -f1)
    if [ "$n" -eq 0 ] || {{ [ "$n" -lt {retention.keep} ]{budget}; }}; then
      n=$((n + 1))
      used=$((used + size))
    else
      rm -rf "$d"
    fi
  done
  echo "backup $id done; $n kept ($used bytes)"
}}

loop() {{
  while true; do
    now=$(date -u +%s)
    next=$(date -u -d "today {at_utc}" +%s)
    [ "$next" -gt "$now" ] || next=$(date -u -d "tomorrow {at_utc}" +%s)
    sleep $((next - now))
    once || echo "scheduled backup failed (exit $?)" >&2
  done
}}

case "${{1:-once}}" in
  once) once ;;
  loop) loop ;;
  *) echo "usage: $0 once|loop" >&2; exit 2 ;;
esac
"""


def systemd_units(exec_start: str, after: str, at_utc: str = SCHEDULE_UTC) -> tuple[str, str]:
    """(service, timer) for VMs: a oneshot service running ``exec_start`` (the daily script, directly or inside the
    MariaDB container), and its daily timer (UTC). ``after``: the unit MariaDB runs in."""
    service = f"""# payctl: the daily MariaDB backup (oneshot; started by payctl-backup.timer).
[Unit]
Description=payctl daily MariaDB backup
After={after}
Requires={after}

[Service]
Type=oneshot
ExecStart={exec_start}
Nice=10
IOSchedulingClass=idle
"""
    timer = f"""# payctl: runs payctl-backup.service daily at {at_utc} UTC (Persistent: a missed run happens at boot).
[Unit]
Description=payctl daily MariaDB backup at {at_utc} UTC

[Timer]
OnCalendar=*-*-* {at_utc}:00 UTC
Persistent=true
RandomizedDelaySec=300

[Install]
WantedBy=timers.target
"""
    return service, timer
