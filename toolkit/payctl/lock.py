"""The deploy lock: one change at a time per deployment, held in a file on the deployment's first reachable node.

The lock is ``<prefix>/payctl/lock.json`` on that node, created atomically with the shell's noclobber (``set -C``:
``O_EXCL``), holding who took it, for which command and when, plus a random token. Only the holder's token releases
it; ``payctl lock release`` (or ``apply --break-lock``) removes a lock whose holder died. A second apply that finds
the file fails with ``LockHeld`` naming the holder.

Everything here goes through a ``Shell``: a function that runs one command on the node and returns (ok, stdout,
stderr). The deploy engine passes one over its pyinfra connection; tests can pass a local one.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from payctl.errors import DeployError, LockHeld

Shell = Callable[[str], tuple[bool, str, str]]

LOCK_DIR = "payctl"
LOCK_FILE = "lock.json"


def lock_path(prefix: str) -> str:
    return f"{prefix}/{LOCK_DIR}/{LOCK_FILE}"


@dataclass(frozen=True)
class LockInfo:
    deployment: str
    holder: str
    command: str
    since: str
    token: str

    def age(self, now: datetime | None = None) -> str:
        try:
            then = datetime.fromisoformat(self.since)
        except ValueError:
            return "unknown time"
        seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
        if seconds < 120:
            return f"{seconds}s"
        if seconds < 7200:
            return f"{seconds // 60}min"
        return f"{seconds // 3600}h"

    def describe(self) -> str:
        return f"{self.holder} running `{self.command}` since {self.since} ({self.age()} ago)"


def who() -> str:
    """``user@host pid N``: enough to find the holder of a lock."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def new_info(deployment: str, command: str) -> LockInfo:
    return LockInfo(deployment, who(), command, datetime.now(UTC).isoformat(timespec="seconds"), uuid.uuid4().hex)


def _parse(text: str) -> LockInfo | None:
    try:
        data = json.loads(text)
        return LockInfo(**{k: str(data[k]) for k in ("deployment", "holder", "command", "since", "token")})
    except (ValueError, KeyError, TypeError):
        return None


def status(shell: Shell, prefix: str) -> LockInfo | None:
    """The current lock, or None when the deployment is not locked."""
    path = shlex.quote(lock_path(prefix))
    ok, out, err = shell(f"if [ -e {path} ]; then cat {path}; else echo UNLOCKED; fi")
    if not ok:
        raise DeployError(f"cannot read the deploy lock {lock_path(prefix)}: {err.strip() or out.strip()}")
    if out.strip() == "UNLOCKED":
        return None
    info = _parse(out)
    if info is None:
        return LockInfo("?", "unknown (unreadable lock file)", "?", "?", "")
    return info


def acquire(shell: Shell, prefix: str, info: LockInfo, *, node: str, break_lock: bool = False) -> LockInfo | None:
    """Take the lock for ``info``; returns the lock that was broken (with ``break_lock``), else None.

    Raises LockHeld naming the holder when another apply holds it.
    """
    broken = None
    if break_lock:
        broken = release_any(shell, prefix)
    path = lock_path(prefix)
    q = shlex.quote(path)
    body = shlex.quote(json.dumps(asdict(info), sort_keys=True))
    cmd = (
        f"mkdir -p {shlex.quote(os.path.dirname(path))} && "
        f"if ( set -C; printf '%s\\n' {body} > {q} ) 2>/dev/null; then echo ACQUIRED; "
        f"else echo HELD; cat {q}; fi"
    )
    ok, out, err = shell(cmd)
    if not ok:
        raise DeployError(f"{node}: cannot take the deploy lock {path}: {err.strip() or out.strip()}")
    first, _, rest = out.strip().partition("\n")
    if first == "ACQUIRED":
        return broken
    held = _parse(rest)
    holder = held.describe() if held else "an unknown holder (unreadable lock file)"
    raise LockHeld(
        f"deployment '{info.deployment}' is locked on {node}: {holder}",
        hint="wait for that command to finish; if it died, run `payctl lock release -i INV` "
        "(or add --break-lock to this apply)",
    )


def release(shell: Shell, prefix: str, info: LockInfo) -> bool:
    """Remove the lock if it is still ours (same token); returns whether it was removed."""
    q = shlex.quote(lock_path(prefix))
    ok, out, _ = shell(f"if grep -qF {shlex.quote(info.token)} {q} 2>/dev/null; then rm -f {q}; echo RELEASED; fi")
    return ok and out.strip() == "RELEASED"


def release_any(shell: Shell, prefix: str) -> LockInfo | None:
    """Remove whatever lock is there (an operator's decision); returns what it was."""
    current = status(shell, prefix)
    if current is not None:
        ok, out, err = shell(f"rm -f {shlex.quote(lock_path(prefix))}")
        if not ok:
            raise DeployError(f"cannot remove the deploy lock {lock_path(prefix)}: {err.strip() or out.strip()}")
    return current
