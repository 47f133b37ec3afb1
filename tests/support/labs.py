"""Lab deployments shared across test modules: bring a lab up and apply a phase once, reuse it for every test that
asks for the same (inventory, phase).

A full ``lab up`` + ``phase4 apply`` costs about two minutes here, and the lab is one network per machine,
so tests that only *use* a deployed lab (gate, monitoring, backup, drills, upgrade) share one instead of each making
their own. A module opts in with::

    pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-1node", 4)]

    def test_x(shared_lab: SharedLab) -> None: ...

``tests/conftest.py`` moves those tests to the end of the session, grouped by (phase, inventory, order) ascending, so
each deployment is made once; a higher phase is applied on top of the lower one, and an inventory that adds nodes to
the current one (lab-2node after lab-1node) grows it: its lab hosts are brought up in the same home and the phase is
applied, the path a real deployment takes (``payctl phase5 apply`` goes through ``scale add-node``). The marker's
``order`` keyword (default 0) orders groups of one (phase, inventory): tests/scale/test_lab_add_node.py grows the
lab-1node phase-4 deployment itself, under load, then hands it over with ``MANAGER.adopt``.
A test that leaves the deployment broken calls ``invalidate()``: the next user gets a
fresh lab. The machine-wide lab lock (``exclusive_lab``) is held from the first bring-up until the deployment is torn
down, and modules that make their own lab release the shared one first (one process never deadlocks on itself).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from payctl import lab
from payctl.inventory import Inventory, load_inventory

LOCK = Path("/run/payctl-lab-tests.lock")
REPO = Path(__file__).resolve().parents[2]
PAYCTL = (sys.executable, "-m", "payctl")


def _acquire(timeout: float) -> IO[str]:
    fh = LOCK.open("a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                pytest.fail(f"another lab test run held {LOCK} for {timeout:.0f}s")
            time.sleep(1)


def clear_leftover_lab() -> None:
    """Remove lab hosts that nobody in a test holds (we hold the lab lock): a lab left up by ``payctl lab up``, by
    the README's demo, or by a killed test run carries another home's deployment and secrets, and a test that adopted
    it would run against that. lab-2node names every bundled lab host (node1, node2, witness)."""
    with tempfile.TemporaryDirectory(prefix="payctl-lab-clear-") as scratch:
        steps = lab.lab_down(load_inventory("lab-2node"), Path(scratch), force=True)
    if steps:
        warnings.warn(f"removed a lab left up on this machine ({len(steps)} steps)", stacklevel=2)


@contextmanager
def exclusive_lab(timeout: float = 1800) -> Iterator[None]:
    """Hold the machine's lab for a whole test module. Every test that brings a lab up (10.77.0.0/24 is one network
    per machine) holds this, so two pytest runs never tear down each other's lab hosts. A shared deployment held by
    this process is torn down first, then any lab left on the machine."""
    MANAGER.release()
    fh = _acquire(timeout)
    try:
        clear_leftover_lab()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@dataclass(frozen=True)
class SharedLab:
    name: str  # the inventory as named on the command line (lab-1node)
    home: Path
    inventory: Inventory
    phase: int

    @property
    def app_source(self) -> Path:
        """A snapshot of app/ taken when the deployment was made: every apply installs the same release even if the
        checkout is edited meanwhile (a re-apply must find nothing to change)."""
        return self.home / "app-source"

    def env(self) -> dict[str, str]:
        """This process's environment for this deployment; a test may point PAYCTL_APP_SOURCE elsewhere."""
        source = os.environ.get("PAYCTL_APP_SOURCE", str(self.app_source))
        return {**os.environ, "PAYCTL_HOME": str(self.home), "PAYCTL_APP_SOURCE": source}

    def invalidate(self) -> None:
        """The deployment is no longer fit to share (a test broke it on purpose): tear it down now."""
        MANAGER.release()

    def payctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run the payctl CLI as a subprocess against this deployment (output captured)."""
        return subprocess.run([*PAYCTL, *argv], capture_output=True, text=True, env=self.env(), timeout=900)


class _Manager:
    """At most one shared deployment at a time, in this process."""

    def __init__(self) -> None:
        self.current: SharedLab | None = None
        self._lock: IO[str] | None = None

    def get(self, inventory: str, phase: int, factory: pytest.TempPathFactory) -> SharedLab:
        cur = self.current
        if cur is not None and cur.name == inventory and cur.phase == phase:
            return cur
        inv = load_inventory(inventory)
        if cur is not None and cur.phase <= phase and (cur.name == inventory or grows(cur.inventory, inv)):
            try:  # on top of the lower phase / the smaller inventory, as a real deployment grows
                if cur.name != inventory:
                    lab.lab_up(inv, cur.home)
                grown = SharedLab(inventory, cur.home, inv, phase)
                self._apply(grown, inventory, phase)
            except BaseException:
                self.release()
                raise
            self.current = grown
            return grown
        self.release()
        if os.geteuid() != 0:
            pytest.fail("the lab tests need root (CI runs them as root)")
        home = factory.mktemp(f"shared-{inventory}")
        self._lock = _acquire(1800)
        try:
            clear_leftover_lab()
            self.current = SharedLab(inventory, home, inv, 0)  # torn down by release() even if the apply fails
            shutil.copytree(REPO / "app", self.current.app_source,
                            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # fmt: skip
            lab.lab_up(inv, home)
            self._apply(self.current, inventory, phase)
        except BaseException:
            self.release()
            raise
        self.current = SharedLab(inventory, home, inv, phase)
        return self.current

    def adopt(self, deployment: SharedLab) -> None:
        """A test grew the current deployment itself (e.g. add-node under load): later users get this one."""
        if self.current is None or self.current.home != deployment.home:
            raise AssertionError("adopt() takes the current shared deployment, grown in place")
        self.current = deployment

    @staticmethod
    def _apply(deployment: SharedLab, inventory: str, phase: int) -> None:
        argv = [*PAYCTL, f"phase{phase}", "apply", "-i", inventory, "--yes", "--no-verify"]
        env = {**deployment.env(), "PAYCTL_APP_SOURCE": str(deployment.app_source)}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(
                f"shared lab: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )

    def release(self) -> None:
        cur, self.current = self.current, None
        try:
            if cur is not None:
                lab.lab_down(cur.inventory, cur.home)
        finally:
            if self._lock is not None:
                with suppress(OSError):
                    fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
                self._lock = None


MANAGER = _Manager()


def grows(smaller: Inventory, larger: Inventory) -> bool:
    """``larger`` is ``smaller`` plus nodes: same deployment, and every node of ``smaller`` in it unchanged."""
    return (
        smaller.deployment == larger.deployment
        and len(larger.nodes) > len(smaller.nodes)
        and all(node in larger.nodes for node in smaller.nodes)
    )


def shared_lab_key(item: pytest.Item) -> tuple[str, int] | None:
    marker = item.get_closest_marker("shared_lab")
    if marker is None:
        return None
    inventory, phase = marker.args
    return str(inventory), int(phase)


def shared_lab_order(item: pytest.Item) -> tuple[int, str, int]:
    """Where a shared-lab test runs: by phase, then inventory, then the marker's ``order`` (default 0)."""
    marker = item.get_closest_marker("shared_lab")
    assert marker is not None
    inventory, phase = marker.args
    return int(phase), str(inventory), int(marker.kwargs.get("order", 0))


def mariadb_sql(socket: str | Path, statement: str) -> str:
    """One statement as MariaDB's root over a lab node's (or a scratch server's) unix socket; tab-separated rows."""
    out = subprocess.run(["mariadb", f"--socket={socket}", "-uroot", "-N", "-B", "-e", statement],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
