"""Deployment secrets: generated once per deployment, kept in ``$PAYCTL_HOME/<deployment>/secrets.yml``.

The file is 0600 in a 0700 directory and is the deployment's identity: the database and Redis users on the hosts were
created with these values, so a lost file cannot be silently regenerated. The deploy engine therefore calls
``load_or_create(home, deployment, allow_create=...)`` with ``allow_create=False`` once it has seen that a host
already runs the deployment, and gets a ``PayctlError`` with a hint instead of fresh passwords.

A value is a ``Secret``: its ``repr``/``str`` are redacted, so it cannot leak through logging, f-strings or tracebacks
by accident; ``reveal()`` is the one explicit way to get the text (to write a 0600 file on a node).
``Secrets.redact(text)`` removes every value from text meant for logs and the audit trail.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets as _random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from payctl.errors import PayctlError

SECRET_NAMES: Final = (
    "mariadb_root",
    "mariadb_app",
    "mariadb_migrate",
    "mariadb_replication",
    "mariadb_exporter",
    "mariadb_backup",
    "redis_app",
    "redis_replication",
    "redis_sentinel",
    "redis_exporter",
    "grafana_admin",
)
#: Names added after deployments existed. No host has an account with them yet, so they are generated for a live
#: deployment too (its next apply creates the account), and the secrets fingerprint leaves them out (a deployment made
#: before they existed keeps its fingerprint).
ADDED_LATER: Final = frozenset({"mariadb_backup"})
# 32 random bytes = 256 bits (43 URL-safe characters); the issue asks for at least 128.
TOKEN_BYTES: Final = 32
REDACTED: Final = "********"
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700

_DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Secret:
    """A secret value whose repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("a secret cannot be empty")
        self._value = value

    def reveal(self) -> str:
        """The clear text, for writing it where it belongs (a 0600 file on a node). Never log the result."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the clear text somewhere we do not control.
        raise TypeError("Secret values are not picklable")


def redact_text(text: str, values: Iterable[Secret | str]) -> str:
    """Replace every occurrence of each value in text with a fixed marker (longest first, so no partial leaks)."""
    clear = sorted({v.reveal() if isinstance(v, Secret) else v for v in values if v}, key=len, reverse=True)
    for value in clear:
        text = text.replace(value, REDACTED)
    return text


@dataclass(frozen=True, repr=False)
class Secrets:
    """The secrets of one deployment, by name (see ``SECRET_NAMES``)."""

    deployment: str
    values: Mapping[str, Secret]

    def __getitem__(self, name: str) -> Secret:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"no secret named {name!r}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def redact(self, text: str) -> str:
        """``text`` with every secret of this deployment replaced by a marker: for logs, audit lines, errors."""
        return redact_text(text, self.values.values())

    def __repr__(self) -> str:
        return f"Secrets(deployment={self.deployment!r}, names={list(self.values)!r})"


def secrets_path(home: Path, deployment: str) -> Path:
    _check_deployment(deployment)
    return home / deployment / "secrets.yml"


def load_or_create(home: Path, deployment: str, allow_create: bool) -> Secrets:
    """Load the deployment's secrets, generating missing ones only when ``allow_create``.

    ``allow_create=False`` is for a deployment that already runs on a host: a missing file (or a missing name) then
    raises a ``PayctlError`` telling the user to restore the file, instead of inventing passwords the hosts do not
    know. Permissions are (re)set to 0700/0600 on every call.
    """
    path = secrets_path(home, deployment)
    stored = _read(path) if path.exists() else {}
    missing = [name for name in SECRET_NAMES if name not in stored]
    if missing and not allow_create and (not stored or not set(missing) <= ADDED_LATER):
        lost = [name for name in missing if name not in ADDED_LATER]
        what = "the secrets file is missing" if not stored else f"secrets {', '.join(lost)} are missing"
        raise PayctlError(
            f"deployment {deployment!r} already runs on its hosts but {what} ({path})",
            hint=f"restore {path} from your backup (or set PAYCTL_HOME to where it lives); payctl will not generate "
            "new passwords for a live deployment",
        )
    _ensure_dir(path.parent)
    if missing:
        for name in missing:
            stored[name] = _random.token_urlsafe(TOKEN_BYTES)
        _write(path, deployment, stored)
    elif path.stat().st_mode & 0o777 != FILE_MODE:
        path.chmod(FILE_MODE)
    return Secrets(deployment, {name: Secret(stored[name]) for name in SECRET_NAMES})


def _check_deployment(deployment: str) -> None:
    if not _DEPLOYMENT_RE.match(deployment) or deployment in {".", ".."}:
        raise PayctlError(
            f"invalid deployment name {deployment!r} for a secrets directory",
            hint="use letters, digits, '-', '_' or '.' (it names a directory under PAYCTL_HOME)",
        )


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o777 != DIR_MODE:
        directory.chmod(DIR_MODE)


def _read(path: Path) -> dict[str, str]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        # The exception text could quote a value: name only the file.
        raise PayctlError(
            f"cannot read secrets file {path} ({type(exc).__name__})",
            hint="restore it from your backup; it must be a YAML mapping with a 'secrets' key",
        ) from None
    values = doc.get("secrets") if isinstance(doc, dict) else None
    if not isinstance(values, dict) or not all(isinstance(v, str) and v for v in values.values()):
        raise PayctlError(
            f"secrets file {path} is malformed",
            hint="restore it from your backup; it must be a YAML mapping with a 'secrets' key of non-empty strings",
        )
    return {str(k): v for k, v in values.items()}


def _write(path: Path, deployment: str, values: Mapping[str, str]) -> None:
    body = yaml.safe_dump({"deployment": deployment, "secrets": dict(values)}, sort_keys=False)
    text = (
        f"# payctl secrets of deployment {deployment!r}: the hosts' database and Redis users use these values.\n"
        "# Keep this file private (0600) and backed up; payctl refuses to re-create it for a live deployment.\n" + body
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # umask may have narrowed or the file may pre-exist on some filesystems
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def known_hosts_path(home: Path, deployment: str) -> Path:
    """The deployment's SSH known_hosts (lab up writes the lab nodes' host keys here; hosts.py verifies against it)."""
    _check_deployment(deployment)
    return home / deployment / "known_hosts"
