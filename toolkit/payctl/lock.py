"""The deploy lock: one change at a time per deployment, held in a file on the deployment's first reachable node.

The lock is ``<prefix>/payctl/lock.json`` on that node, created atomically with the shell's noclobber (``set -C``:
``O_EXCL``), holding who took it, for which command and when, plus a random token. Only the holder's token releases
it; ``payctl lock release`` (or ``--break-lock``) removes a lock whose holder died. A second command that finds the
file fails with ``LockHeld`` naming the holder.

Placement (``take``): the lock goes on the first node, in inventory order, that answers SSH. Normally that is the
first node. When it does not answer, nothing here can tell a dead host from a network split, so ``take`` refuses
(``LockNodeDown``, naming the node) unless the operator passes ``--break-lock``, asserting that no other change is in
flight: the lock is then taken on the next node that answers. A lock file found on any other reachable node (left
there while the nodes before it were down) also refuses the command, and ``--break-lock`` removes it too.

Everything here goes through a ``Shell``: a function that runs one command on the node and returns (ok, stdout,
stderr), and for placement an ``Opener`` (node name -> its Shell, raising ``PayctlError`` when the node does not
answer). The deploy engine passes them over its pyinfra connections (``payctl.hosts.node_shells``); tests pass local
shells and an opener that refuses for a "dead" node.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from payctl.errors import DeployError, LockHeld, LockNodeDown, PayctlError

Shell = Callable[[str], tuple[bool, str, str]]
#: A shell on the named node (connected on first use); raises PayctlError when the node does not answer.
Opener = Callable[[str], Shell]

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


# ------------------------------------------------------------------------------------------------ placement


@dataclass(frozen=True)
class NodeLock:
    """One node's view of the lock: what its lock file holds, or why the node did not answer."""

    node: str
    prefix: str
    info: LockInfo | None = None
    down: str = ""  # why the node did not answer ("" when it did)


@dataclass
class Taken:
    """A lock this process holds: where, with what, and what it broke or stepped over to get there."""

    node: str
    prefix: str
    info: LockInfo
    shell: Shell
    down: dict[str, str] = field(default_factory=dict)  # nodes before ``node`` that did not answer: why
    broken: list[tuple[str, LockInfo]] = field(default_factory=list)  # (node, lock) removed with break_lock


def survey(nodes: Sequence[tuple[str, str]], open_shell: Opener) -> list[NodeLock]:
    """Every node's lock file, in inventory order (``nodes``: (name, prefix)); a node that does not answer says why."""
    out = []
    for node, prefix in nodes:
        try:
            shell = open_shell(node)
        except PayctlError as exc:
            out.append(NodeLock(node, prefix, down=exc.message))
            continue
        out.append(NodeLock(node, prefix, status(shell, prefix)))
    return out


def placement(view: Sequence[NodeLock]) -> NodeLock | None:
    """Where the lock is taken now: the first node that answered."""
    return next((v for v in view if not v.down), None)


def take(nodes: Sequence[tuple[str, str]], open_shell: Opener, info: LockInfo, *, break_lock: bool = False) -> Taken:
    """Take the deployment's lock on the first node that answers (``nodes``: (name, prefix), inventory order).

    Refuses with ``LockNodeDown`` when an earlier node does not answer, unless ``break_lock`` (the operator says that
    node is dead); with ``LockHeld`` when the lock, or a lock left on another reachable node, is held. With
    ``break_lock`` every lock found on a reachable node is removed (returned in ``Taken.broken``).
    """
    down: dict[str, str] = {}
    shell: Shell | None = None
    at = 0
    for node, _ in nodes:
        try:
            shell = open_shell(node)
            break
        except PayctlError as exc:
            down[node] = exc.message
            at += 1
    if shell is None:
        raise LockNodeDown(
            f"cannot take the deploy lock of '{info.deployment}': no node answers "
            f"({'; '.join(f'{n}: {why}' for n, why in down.items())})",
            hint="check that the hosts are up and sshd runs on them",
        )
    node, prefix = nodes[at]
    if down and not break_lock:
        first = next(iter(down))
        raise LockNodeDown(
            f"cannot take the deploy lock of '{info.deployment}': {first} does not answer ({down[first]}); "
            f"the lock lives on the first node that answers",
            hint=f"if {first} is dead, retry with --break-lock: the lock is then taken on {node} "
            "(only when no other change is in flight)",
        )
    broken: list[tuple[str, LockInfo]] = []
    old = acquire(shell, prefix, info, node=node, break_lock=break_lock)
    if old is not None:
        broken.append((node, old))
    taken = Taken(node, prefix, info, shell, down, broken)
    try:
        for other, other_prefix in nodes[at + 1 :]:
            try:
                other_shell = open_shell(other)
            except PayctlError:
                continue  # it cannot hold a lock anyone sees; `payctl lock status` shows it when it is back
            stray = status(other_shell, other_prefix)
            if stray is None:
                continue
            if not break_lock:
                raise LockHeld(
                    f"deployment '{info.deployment}' is locked on {other}: {stray.describe()} "
                    f"(taken there while {node} did not answer)",
                    hint="wait for that command to finish; if it died, run `payctl lock release -i INV` "
                    "(or add --break-lock to this command)",
                )
            release_any(other_shell, other_prefix)
            broken.append((other, stray))
    except BaseException:
        give_back(taken)
        raise
    return taken


def give_back(taken: Taken) -> bool:
    """Release a lock taken with ``take`` (only if it is still ours)."""
    return release(taken.shell, taken.prefix, taken.info)
