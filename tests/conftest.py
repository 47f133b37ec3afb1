from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.labs import MANAGER, SharedLab, shared_lab_key, shared_lab_order
from tests.support.services import MariaDB, Redis

REPO = Path(__file__).resolve().parents[1]
LAB_GROUP = "lab"
_LAB_SEEN = False
_NICED = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shared_lab(inventory, phase, order=0): use the session's shared lab deployment (tests/support/labs.py)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on a shared lab deployment go last, grouped by (phase, inventory, order), lower phases first: each
    deployment is made once and grows in place (sorted() is stable: file order within a group)."""
    own = [item for item in items if shared_lab_key(item) is None]
    shared = sorted((item for item in items if shared_lab_key(item) is not None), key=shared_lab_order)
    items[:] = own + shared
    strays = [item.nodeid for item in items if item.get_closest_marker("lab") is not None and not is_lab(item.nodeid)]
    if strays:
        raise pytest.UsageError(f"lab tests outside a test_lab_*.py file: {strays[:3]}: the xdist scheduler "
                                "(tests/conftest.py) keeps lab tests on one worker by that file name")  # fmt: skip


def is_lab(nodeid: str) -> bool:
    """Lab tests live in ``test_lab_*.py`` files (a few unit tests there too: harmless on the lab worker)."""
    return Path(nodeid.split("::")[0]).name.startswith("test_lab_")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (scripts/test: ``-n 2``) every lab test is one work unit, so one worker runs them all, in
    collection order (one lab per machine; the shared deployment lives in that worker's MANAGER), while the other
    worker runs everything else alongside. The unit is the largest, so it is handed out first. (xdist's own
    ``--dist loadgroup`` does not group under pytest 9: the nodeid suffix it relies on is not seen.)"""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class LabOnOneWorker(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return LAB_GROUP if is_lab(nodeid) else nodeid

    return LabOnOneWorker(config, log)


@pytest.fixture(autouse=True)
def _lab_first(request: pytest.FixtureRequest) -> None:
    """Under xdist, a worker whose first test is not a lab test is not the lab worker: it lowers its CPU priority
    once (it and its children: MariaDB, Kafka, the app), so on two cores the lab worker wins whenever both want a
    core. The lab's timing (drills' recovery bounds, add-node under load) is the more fragile. Serial runs: no-op."""
    global _LAB_SEEN, _NICED
    if is_lab(request.node.nodeid):
        _LAB_SEEN = True
    elif not _LAB_SEEN and not _NICED and os.environ.get("PYTEST_XDIST_WORKER"):
        os.nice(10)
        _NICED = True


@pytest.fixture(scope="session")
def _shared_lab_session() -> Iterator[None]:
    try:
        yield
    finally:
        MANAGER.release()


@pytest.fixture
def shared_lab(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    _shared_lab_session: None,
) -> SharedLab:
    """The deployment named by the test's ``shared_lab(inventory, phase)`` marker, with PAYCTL_HOME pointing at it."""
    key = shared_lab_key(request.node)
    if key is None:
        pytest.fail("the shared_lab fixture needs @pytest.mark.shared_lab(inventory, phase)")
    deployment = MANAGER.get(key[0], key[1], tmp_path_factory)
    monkeypatch.setenv("PAYCTL_HOME", str(deployment.home))
    monkeypatch.setenv("PAYCTL_APP_SOURCE", str(deployment.app_source))
    return deployment


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """One real MariaDB for the session; tests isolate themselves with their own database names."""
    server = MariaDB(tmp_path_factory.mktemp("mariadb")).start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
