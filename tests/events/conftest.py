from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kafka import Kafka


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """One real Apache Kafka (KRaft, combined broker+controller) for the session; tests use their own topics."""
    broker = Kafka(tmp_path_factory.mktemp("kafka")).start()
    yield broker
    broker.remove()
