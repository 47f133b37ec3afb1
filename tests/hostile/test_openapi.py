"""The OpenAPI document: served, valid OpenAPI 3.0, and exactly the live routes (nothing missing, nothing extra)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from payapp.app import create_app
from payapp.openapi import ERROR_CODES, document
from payapp.settings import Settings

METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}


def _live_routes(settings: Settings) -> set[tuple[str, str]]:
    """(method, path with {} for parameters) of every route create_app registers; HEAD only where GET is not."""
    app = create_app(settings)
    routes = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        routes.add((route.method.lower(), re.sub(r"\{[^}]+\}", "{}", resource.canonical)))
    heads = {r for r in routes if r[0] == "head"}
    assert {("get", p) for _, p in heads} <= routes, "a HEAD route without its GET"
    return routes - heads


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for path, item in doc["paths"].items():
        for method in item:
            assert method in METHODS, (path, method)
            out.add((method, re.sub(r"\{[^}]+\}", "{}", path)))
    return out


async def test_openapi_json_is_served_and_valid(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = await resp.json()
    validate(doc)  # raises on anything that is not OpenAPI 3.0
    assert doc["openapi"].startswith("3.0")
    assert doc == document("off")


def test_every_live_route_is_documented_and_nothing_else(settings: Settings) -> None:
    live = _live_routes(settings)
    for auth in ("off", "apikey"):
        documented = _documented(document(auth))
        assert live - documented == set(), f"routes missing from the document ({auth})"
        assert documented - live == set(), f"documented operations that do not exist ({auth})"
    assert ("post", "/payments/capture/{}") in live and ("get", "/openapi.json") in live


def test_apikey_document_requires_bearer_and_documents_401() -> None:
    validate(document("apikey"))
    doc = document("apikey")
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, item in doc["paths"].items():
        for op in item.values():
            if path.startswith("/payments"):
                assert op["security"] == [{"apiKey": []}], path
                assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
            else:
                assert "security" not in op and "401" not in op["responses"], path
    authorize = doc["paths"]["/payments/authorize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "merchantId" not in authorize["required"]


def test_off_document_has_no_401_and_requires_merchant() -> None:
    doc = document("off")
    assert "securitySchemes" not in doc["components"]
    for item in doc["paths"].values():
        for op in item.values():
            assert "401" not in op["responses"] and "security" not in op
    get = doc["paths"]["/payments/{paymentId}"]["get"]
    assert next(p for p in get["parameters"] if p["name"] == "merchantId")["required"] is True


def test_every_error_response_uses_the_error_shape_with_its_codes() -> None:
    doc = document("apikey")
    schemas = doc["components"]["schemas"]
    assert schemas["Error"]["required"] == ["code", "message"]
    assert schemas["Error"]["additionalProperties"] is False
    seen = set()
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op["responses"].items():
                if not status.startswith(("4", "5")) or "/health" in str(op.get("operationId")):
                    continue
                if op["operationId"] == "health":
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == f"#/components/schemas/Error{status}", (op["operationId"], status)
                codes = schemas[f"Error{status}"]["allOf"][1]["properties"]["code"]["enum"]
                assert codes == list(ERROR_CODES[int(status)])
                seen.add(int(status))
                if status in ("429", "503"):
                    assert response["headers"]["Retry-After"]["required"] is True
    assert seen == {400, 401, 404, 408, 409, 413, 422, 429, 503}


def test_headers_are_documented() -> None:
    doc = document("off")
    capture = doc["paths"]["/payments/capture/{paymentId}"]["post"]
    assert any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in capture["parameters"])
    assert "Idempotent-Replayed" in capture["responses"]["200"]["headers"]
    assert "Idempotent-Replayed" in doc["paths"]["/payments/authorize"]["post"]["responses"]["200"]["headers"]
