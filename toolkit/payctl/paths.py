"""Where payctl finds its own data and keeps its local state.

* ``payctl_home()``: local state (secrets, lab keys, crash log) lives under ``$PAYCTL_HOME``, default ``.payctl`` in
  the current directory.
* ``data_dir(kind)``: the bundled ``inventories``, ``phases`` and ``templates`` folders. They ship inside the payctl
  package (``payctl.inventories`` ...; see pyproject.toml). In an editable install setuptools' finder cannot import a
  mapped sub-package that has no ``__init__.py``, so a source checkout falls back to the folder at the top of the repo.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Literal

DataKind = Literal["inventories", "phases", "templates"]

_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def payctl_home() -> Path:
    """The directory for local state: ``$PAYCTL_HOME`` or ``./.payctl``."""
    env = os.environ.get("PAYCTL_HOME")
    return Path(env) if env else Path.cwd() / ".payctl"


def data_dir(kind: DataKind) -> Path:
    """The folder holding payctl's bundled ``kind`` files, in a normal install or a source checkout."""
    try:
        res = importlib.resources.files(f"payctl.{kind}")
    except ModuleNotFoundError:
        res = None
    if res is not None:
        path = Path(str(res))
        if path.is_dir():
            return path
    fallback = _CHECKOUT_ROOT / kind
    if fallback.is_dir():
        return fallback
    raise FileNotFoundError(f"payctl's bundled {kind} folder is missing (looked in the package and {fallback})")
