"""schemathesis against a real ``payapp serve`` on loopback, from the document it serves at /openapi.json.

Every operation gets positive and negative examples (bounded: MAX_EXAMPLES each, with a per-example deadline);
each response must be < 500, carry a documented status and content type, and match its documented schema —
so every error is ``{code, message, paymentId?}`` with a code that its status may carry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from payapp.auth import create_merchant
from payapp.openapi import document
from tests.app.conftest import ServeProcess
from tests.hostile.conftest import running_server
from tests.support.services import MariaDB, Redis

MAX_EXAMPLES = 40
APIKEY_EXAMPLES = 20
STATEFUL_EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def checks_for(case: schemathesis.Case) -> list[Any]:
    """CHECKS, plus: other methods on the operation's path are 405 with Allow. Not for /payments/authorize, which
    is also GET /payments/{paymentId} with an id that is not a number (400, as documented)."""
    return CHECKS if case.operation.path == "/payments/authorize" else [*CHECKS, unsupported_method]

pytestmark = pytest.mark.slow


# The document the server serves (test_openapi checks they are the same); loaded at collection, so that each
# operation is its own test. (schemathesis.pytest.from_fixture does not work with pytest 9.)
schema = schemathesis.openapi.from_dict(document("off"))
keyed_schema = schemathesis.openapi.from_dict(document("apikey"))


@pytest.fixture(scope="module")
def base_url(fuzz_server: ServeProcess) -> str:
    served = requests.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    assert served == document("off")
    return fuzz_server.url


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck))
def test_fuzz_operation(case: schemathesis.Case, base_url: str, http: requests.Session) -> None:
    case.call_and_validate(base_url=base_url, session=http, checks=checks_for(case), timeout=10)


@pytest.fixture(scope="module")
def keyed_server(mariadb: MariaDB, redis_server: Redis,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real server with PAYAPP_AUTH=apikey, and the Authorization header of one of its merchants."""
    with running_server(mariadb, redis_server, tmp_path_factory.mktemp("keyed"), AUTH="apikey") as (proc, db):
        key = asyncio.run(create_merchant(db.url, "fuzz-merchant", "fuzz"))
        served = requests.get(proc.url + "/openapi.json", timeout=10).json()
        assert served == document("apikey")
        yield proc.url, {"Authorization": f"Bearer {key}"}


@keyed_schema.parametrize()
@settings(max_examples=APIKEY_EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck))
def test_fuzz_operation_with_api_keys(case: schemathesis.Case, keyed_server: tuple[str, dict[str, str]],
                                      http: requests.Session) -> None:
    """The same, with a valid key on every request; ignored_auth re-sends without it and with a wrong one (401)."""
    url, auth = keyed_server
    case.call_and_validate(base_url=url, session=http, headers=auth, checks=[*checks_for(case), ignored_auth],
                           timeout=10)


def test_fuzz_stateful_chains(base_url: str, http: requests.Session) -> None:
    """Follow the document's links (authorize -> capture/void/get -> refund ...) so fuzzing reaches real payments.

    Hypothesis assumes the same choices give the same run, but the server remembers (a second capture of the same
    payment is 409). So each scenario authorizes for a merchant of its own (a fresh prefix on the generated
    merchantId; the links carry it on), and check failures are collected rather than raised, so Hypothesis never
    replays a scenario against a server that has moved on.
    """
    seen: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    api = schemathesis.openapi.from_dict(document("off"))
    api.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])  # valid steps go deeper
    machine = api.as_state_machine()

    class Chains(machine):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            self.scenario = uuid.uuid4().hex[:8]

        def before_call(self, case: schemathesis.Case) -> None:
            if case.operation.label == "POST /payments/authorize" and isinstance(case.body, dict):
                case.body["merchantId"] = (self.scenario + str(case.body.get("merchantId", "")))[:32]

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": base_url, "session": http, "timeout": 10}

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            seen[(case.operation.label, response.status_code)] += 1
            try:
                case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)
            except Exception as exc:  # collected: see the docstring
                failures.append(f"{case.operation.label} {case.body!r:.300} -> {response.status_code}: {exc}")

    Chains.run(settings=settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=8, deadline=None,
                                 database=None, derandomize=True, phases=[Phase.generate],
                                 suppress_health_check=list(HealthCheck)))
    print(sorted(seen.items()))
    assert failures == []
    # The chains reached the money operations on payments that exist, not only their 400/404 paths (a 409 is a
    # refusal of a real payment's state: the payment exists and is this merchant's).
    for label in ("POST /payments/authorize", "POST /payments/capture/{paymentId}", "GET /payments/{paymentId}"):
        assert seen[(label, 200)] > 0, (label, sorted(seen.items()))
    for label in ("POST /payments/refund/{paymentId}", "POST /payments/void/{paymentId}"):
        assert seen[(label, 200)] + seen[(label, 409)] > 0, (label, sorted(seen.items()))
