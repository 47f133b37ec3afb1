"""payapp releases on a node: one virtualenv per release, a ``current`` symlink, the previous ones kept for rollback.

Layout under the node's prefix::

    releases/0001-3f9c0a1b2c3d4e5f/     a virtualenv installed from the wheelhouse with that cache key
    releases/0002-8a7b6c5d4e3f2a1b/     ... (``.payctl-manifest`` inside, written last: only then is it complete)
    current -> releases/0002-8a7b6c5d4e3f2a1b
    venv -> current                     the old path, kept as an alias (payctl status, payctl verify read it)

Programs run ``<prefix>/current/bin/payapp``: switching ``current`` (``ln -sfn`` to a temporary name, then
``mv -T``, which is one rename(2)) and restarting the programs activates another release. A release is named
``<counter>-<wheelhouse key>``: the counter orders releases (the newest is the highest), the key says which payapp
build it holds. A virtualenv is not relocatable (its scripts name their interpreter by absolute path), so a release is
installed in place and is complete only once its manifest copy exists; an incomplete directory is ignored and pruned.

"Previous" is the newest complete release older than ``current``. A rollback deletes the release it left (it is the
bad one), so rolling back twice goes two releases back, and an upgrade after a rollback never returns to it.
Retention keeps ``current`` and the ``KEEP_PREVIOUS`` newest releases below it; everything else is deleted.

Pure functions and shell text; nothing runs here.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from payctl.errors import PayctlError
from payctl.wheelhouse import MANIFEST

RELEASES = "releases"
CURRENT = "current"
LEGACY_VENV = "venv"
RELEASE_MANIFEST = ".payctl-manifest"
#: Releases kept below the current one (rollback targets). At least 2: one rollback, then one more.
KEEP_PREVIOUS = 2

_NAME = re.compile(r"^(?P<number>\d{4,})-(?P<key>[0-9a-f]{8,64})$")


@dataclass(frozen=True, order=True)
class Release:
    number: int
    key: str

    @property
    def name(self) -> str:
        return f"{self.number:04d}-{self.key}"


def parse(name: str) -> Release | None:
    """``0003-3f9c0a1b2c3d4e5f`` -> Release(3, key); None for anything else (temporary or foreign entries)."""
    m = _NAME.match(name)
    return Release(int(m.group("number")), m.group("key")) if m else None


def ordered(names: Iterable[str]) -> list[Release]:
    """The valid release names, oldest first."""
    return sorted(r for r in (parse(n) for n in names) if r is not None)


def next_name(existing: Iterable[str], key: str) -> str:
    """The name of a new release of wheelhouse ``key``: one above the highest counter on the node."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", key):
        raise PayctlError(f"not a wheelhouse key: {key!r}")
    releases = ordered(existing)
    return Release((releases[-1].number + 1) if releases else 1, key).name


def previous(existing: Iterable[str], current: str) -> str | None:
    """The newest release older than ``current`` (the rollback target), or None."""
    cur = parse(current)
    if cur is None:
        return None
    older = [r for r in ordered(existing) if r < cur]
    return older[-1].name if older else None


def keep(existing: Iterable[str], current: str, keep_previous: int = KEEP_PREVIOUS) -> list[str]:
    """What retention keeps: ``current`` and the ``keep_previous`` newest releases older than it, oldest first."""
    cur = parse(current)
    if cur is None:
        return []
    older = [r for r in ordered(existing) if r < cur]
    kept = older[-keep_previous:] if keep_previous > 0 else []
    return [r.name for r in (*kept, cur)]


def prune(existing: Iterable[str], current: str, keep_previous: int = KEEP_PREVIOUS) -> list[str]:
    """The releases retention deletes (newer ones than ``current`` included: left over from a failed upgrade)."""
    kept = set(keep(existing, current, keep_previous))
    return [r.name for r in ordered(existing) if r.name not in kept]


# ------------------------------------------------------------------------------------------------------ shell


def release_dir(prefix: str, name: str) -> str:
    return f"{prefix}/{RELEASES}/{name}"


def install_command(prefix: str, name: str, wheelhouse_dir: str, python: str = "python3") -> str:
    """Create the release's virtualenv and install payapp from the node's wheelhouse (no index); the manifest copy is
    written last, so a release without it is incomplete (a crash half-way leaves nothing that looks usable)."""
    q = shlex.quote
    r = q(release_dir(prefix, name))
    wh = q(wheelhouse_dir)
    return (
        f"set -e; mkdir -p {q(prefix + '/' + RELEASES)}; rm -rf {r}; {python} -m venv {r}; "
        f"{r}/bin/pip install --quiet --disable-pip-version-check --no-index --find-links {wh} {wh}/*.whl; "
        f"{r}/bin/payapp --help > /dev/null; cp {wh}/{MANIFEST} {r}/{RELEASE_MANIFEST}"
    )


def switch_command(prefix: str, name: str) -> str:
    """Point ``current`` at the release in one rename; make ``venv`` an alias of ``current`` (a real ``venv``
    directory from before releases existed is removed: its programs are restarted by the caller)."""
    q = shlex.quote
    p = q(prefix)
    rel = q(f"{RELEASES}/{name}")
    return (
        f"set -e; cd {p}; [ -f {rel}/{RELEASE_MANIFEST} ] || {{ echo 'release {name} is not complete' >&2; exit 1; }}; "
        f"ln -sfn {rel} {CURRENT}.payctl-new; mv -T {CURRENT}.payctl-new {CURRENT}; "
        f"if [ -d {LEGACY_VENV} ] && [ ! -L {LEGACY_VENV} ]; then rm -rf {LEGACY_VENV}; fi; "
        f"[ -L {LEGACY_VENV} ] || ln -s {CURRENT} {LEGACY_VENV}"
    )


def prune_command(prefix: str, kept: Iterable[str]) -> str:
    """Delete every entry of ``releases/`` except ``kept`` (incomplete and temporary ones included).

    Never deletes what ``current`` points at, whatever the caller passed."""
    q = shlex.quote
    names = " ".join(q(k) for k in kept)
    return (
        f"cd {q(prefix + '/' + RELEASES)} 2>/dev/null || exit 0; cur=$(basename \"$(readlink ../{CURRENT})\"); "
        f'for d in * .[!.]*; do [ -e "$d" ] || continue; [ "$d" = "$cur" ] && continue; '
        f'case " {names} " in *" $d "*) ;; *) rm -rf -- "$d";; esac; done; exit 0'
    )


def facts_lines(prefix_var: str = "$P") -> str:
    """Lines for ``runtimes.facts_script``: the current release, its manifest hash, and the complete releases."""
    p = prefix_var
    return (
        f'cur=$(readlink "{p}/{CURRENT}" 2>/dev/null) && echo "release_current=${{cur##*/}}"\n'
        f'[ -f "{p}/{CURRENT}/{RELEASE_MANIFEST}" ] && '
        f'echo "release_manifest=$(sha256sum < "{p}/{CURRENT}/{RELEASE_MANIFEST}" | cut -c1-64)"\n'
        f'[ -x "{p}/{CURRENT}/bin/payapp" ] && echo release_ok=1\n'
        f'echo "releases=$(cd "{p}/{RELEASES}" 2>/dev/null && for d in *; do '
        f'[ -f "$d/{RELEASE_MANIFEST}" ] && printf "%s," "$d"; done)"\n'
    )
