from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.labs import MANAGER, SharedLab, shared_lab_key, shared_lab_order
from tests.support.services import MariaDB, Redis

REPO = Path(__file__).resolve().parents[1]


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
