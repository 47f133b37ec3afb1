"""The audit log: one JSON line per apply (or down), on the node and locally.

Locally: ``$PAYCTL_HOME/<deployment>/audit.jsonl``. On the node: ``<prefix>/payctl/audit.jsonl`` on every node the
command touched, so the history survives the laptop that ran it. A record says who, when, which command and phase,
the inventory's hash, which files changed, which services restarted, how it ended and how long it took. Text fields go
through the deployment's redactor before anything is written: secrets never reach the log.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from payctl.lock import who
from payctl.secrets import DIR_MODE

AUDIT_FILE = "audit.jsonl"


@dataclass(frozen=True)
class AuditRecord:
    deployment: str
    command: str
    phase: int | None
    inventory: str
    inventory_sha256: str
    nodes: tuple[str, ...]
    result: str  # ok | failed | aborted | gate-failed
    changed_files: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    error: str = ""
    duration_s: float = 0.0
    who: str = field(default_factory=who)
    when: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def line(self, redact: Callable[[str], str]) -> str:
        """One JSON line (no newline), every string redacted."""
        data = asdict(self)

        def clean(value: object) -> object:
            if isinstance(value, str):
                return redact(value)
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value

        return json.dumps({k: clean(v) for k, v in data.items()}, sort_keys=False)


def inventory_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def local_path(home: Path, deployment: str) -> Path:
    return home / deployment / AUDIT_FILE


def node_path(prefix: str) -> str:
    return f"{prefix}/payctl/{AUDIT_FILE}"


def append_local(home: Path, record: AuditRecord, redact: Callable[[str], str]) -> Path:
    path = local_path(home, record.deployment)
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(record.line(redact) + "\n")
    return path


def append_command(prefix: str, line: str) -> str:
    """The shell command that appends ``line`` to the node's audit log (0600, created if needed)."""
    path = node_path(prefix)
    return (
        f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && umask 077 && "
        f"printf '%s\\n' {shlex.quote(line)} >> {shlex.quote(path)}"
    )


def read_local(home: Path, deployment: str, last: int = 20) -> list[dict[str, object]]:
    path = local_path(home, deployment)
    if not path.is_file():
        return []
    lines: Sequence[str] = path.read_text().splitlines()[-last:]
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out


def last_change(home: Path, deployment: str) -> dict[str, object] | None:
    """The deployment's latest audited change (an apply, its gate, a down), as ``payctl status`` shows it."""
    records = read_local(home, deployment, last=1)
    if not records or not isinstance(records[-1], dict):
        return None
    rec = records[-1]
    return {k: rec.get(k) for k in ("command", "phase", "result", "when", "error")}
