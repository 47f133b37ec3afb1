from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on a shared lab deployment go last, grouped by (phase, inventory, order), lower phases first: each
    deployment is made once and grows in place (sorted() is stable: file order within a group).

    Under pytest-xdist (scripts/test: ``-n 2 --dist loadgroup``) every lab test is in one group, so one worker runs
    them all, in this order (one lab per machine; the shared deployment lives in that worker's MANAGER), while the
    other worker runs everything else alongside."""
    own = [item for item in items if shared_lab_key(item) is None]
    shared = sorted((item for item in items if shared_lab_key(item) is not None), key=shared_lab_order)
    items[:] = own + shared
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(pytest.mark.xdist_group(LAB_GROUP))


@pytest.fixture(autouse=True)
def _lab_first(request: pytest.FixtureRequest) -> None:
    """Under xdist, a worker whose first test is not a lab test is not the lab worker: it lowers its CPU priority
    once (it and its children: MariaDB, Kafka, the app), so on two cores the lab worker wins whenever both want a
    core. The lab's timing (drills' recovery bounds, add-node under load) is the more fragile. Serial runs: no-op."""
    global _LAB_SEEN, _NICED
    if request.node.get_closest_marker("lab") is not None:
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
