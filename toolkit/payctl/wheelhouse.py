"""The app's wheelhouse: ``payapp`` and its dependencies as wheels, built once per source hash and Python version.

Nodes install payapp into a virtualenv with ``pip install --no-index --find-links <wheelhouse>``: they need no access
to PyPI and get exactly the wheels built here. The wheelhouse holds payapp and its runtime dependencies only (``pip
wheel ./app``), never payctl or pyinfra.

Cache: ``$PAYCTL_HOME/wheelhouse/<key>/`` where the key hashes every source file of ``app/`` (pyproject, package,
migrations) together with the target Python version; a build goes to a temporary directory that is renamed into place
only when complete, so a crashed build never leaves a half cache. The same payapp source and Python give the same
directory, and therefore the same files on the node (re-apply uploads nothing).

When the node's Python (``major.minor``) differs from the one running payctl, payapp is built as a pure wheel and the
dependencies are downloaded as binary wheels for the node's version (``pip download --only-binary=:all:
--python-version``); nothing is compiled for the wrong interpreter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from payctl.errors import DeployError, PayctlError

_CHECKOUT_APP = Path(__file__).resolve().parents[2] / "app"
_SKIP_DIRS = {"__pycache__", "build", "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
MANIFEST = "MANIFEST.sha256"


@dataclass(frozen=True)
class Wheelhouse:
    """A complete wheelhouse directory: its cache key, the wheel files and a manifest naming them with hashes."""

    key: str
    directory: Path
    python: str

    @property
    def wheels(self) -> tuple[Path, ...]:
        return tuple(sorted(self.directory.glob("*.whl")))

    @property
    def manifest(self) -> str:
        """``<sha256>  <file>`` per wheel: identical text means identical wheels on the node."""
        return (self.directory / MANIFEST).read_text()


def app_source() -> Path:
    """The payapp source tree: ``$PAYCTL_APP_SOURCE`` if set, else ``app/`` of the checkout payctl runs from."""
    override = os.environ.get("PAYCTL_APP_SOURCE")
    if override:
        if not (Path(override) / "pyproject.toml").is_file():
            raise PayctlError(f"PAYCTL_APP_SOURCE={override} holds no pyproject.toml", hint="point it at a payapp tree")
        return Path(override)
    if (_CHECKOUT_APP / "pyproject.toml").is_file():
        return _CHECKOUT_APP
    raise PayctlError(
        "cannot find the payapp source (app/pyproject.toml) to build the wheelhouse",
        hint="run payctl from a checkout of the repository (scripts/setup), where app/ holds the payment service",
    )


def source_files(app_dir: Path) -> list[Path]:
    """Every file that goes into the payapp wheel, in a stable order (build artefacts and egg-info excluded)."""
    out: list[Path] = []
    for root, dirs, names in os.walk(app_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            if name.endswith((".pyc", ".pyo")):
                continue
            out.append(Path(root) / name)
    return out


def cache_key(app_dir: Path, python: str) -> str:
    """sha256 over the payapp sources (paths and bytes) and the target Python version; 16 hex digits."""
    h = hashlib.sha256(f"python={python}\n".encode())
    for path in source_files(app_dir):
        h.update(str(path.relative_to(app_dir)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def local_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise DeployError(
            f"building the payapp wheelhouse failed while {what}: {tail or f'pip exited {proc.returncode}'}",
            hint="pip needs PyPI (or a configured index) for payapp's dependencies; check the error above",
        )


def _write_manifest(directory: Path) -> None:
    lines = [f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in sorted(directory.glob("*.whl"))]
    (directory / MANIFEST).write_text("".join(lines))


def build(cache_root: Path, python: str | None = None, app_dir: Path | None = None) -> Wheelhouse:
    """The wheelhouse for the current payapp source and ``python`` (default: this interpreter's version).

    Returns the cached directory when it exists; otherwise builds it. Raises DeployError when pip fails.
    """
    app_dir = app_dir or app_source()
    python = python or local_python()
    key = cache_key(app_dir, python)
    final = cache_root / key
    if (final / MANIFEST).is_file():
        return Wheelhouse(key, final, python)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Build from a snapshot of exactly the hashed files: pip writes build/ and egg-info into the tree it builds,
    # and an edit made while building must not end up in a wheelhouse cached under the old key.
    snapshot = tmp / "src"
    for path in source_files(app_dir):
        dest = snapshot / path.relative_to(app_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    if cache_key(snapshot, python) != key:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError(f"{app_dir} changed while payctl read it", hint="re-run once the edit is saved")
    app_dir = snapshot
    try:
        if python == local_python():
            _pip(["wheel", str(app_dir), "-w", str(tmp)], "running pip wheel")
        else:
            _pip(["wheel", "--no-deps", str(app_dir), "-w", str(tmp)], "building the payapp wheel")
            own = next(tmp.glob("payapp-*.whl"))
            _pip(
                ["download", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", str(tmp),
                 str(own)],
                f"downloading dependency wheels for Python {python}",
            )  # fmt: skip
        if not any(tmp.glob("payapp-*.whl")):
            raise DeployError("pip produced no payapp wheel", hint="check app/pyproject.toml")
        shutil.rmtree(snapshot)
        _write_manifest(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():  # another payctl won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Wheelhouse(key, final, python)


def payapp_version(house: Wheelhouse) -> str:
    """The payapp version in the wheelhouse (from the wheel's file name)."""
    wheel = next((w for w in house.wheels if w.name.startswith("payapp-")), None)
    if wheel is None:
        raise DeployError(f"the wheelhouse {house.directory} holds no payapp wheel")
    return wheel.name.split("-")[1]
