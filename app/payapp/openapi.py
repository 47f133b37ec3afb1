"""The OpenAPI 3.0 description of the payment API, built as data and served at ``GET /openapi.json``.

The document describes the service as it runs: with ``PAYAPP_AUTH=apikey`` every payment operation requires
``Authorization: Bearer <key>`` (401 documented) and ``merchantId`` becomes optional (it must match the key when
given); with ``off`` the ``merchantId`` is required and no 401 exists. The limits come from the code that enforces
them (``payapp.validation``, ``payapp.api``), so the document cannot drift from the checks. Every error response has
one shape, ``{code, message, paymentId?}``, with the codes that status can carry. tests/hostile checks it against
the live routes and fuzzes every operation from it with schemathesis.

OpenAPI 3.0 rather than 3.1 on purpose: 3.0's JSON Schema dialect says ``1.0`` is not an integer, as the service
does (an amount of ``100.0`` is refused), while 3.1's counts it as one. Identifiers are documented as printable
ASCII, the portable subset; the service also accepts other printable Unicode characters and refuses control and
other non-printable characters (including unassigned code points) with 400.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from payapp import __version__
from payapp.api import MAX_BODY_BYTES
from payapp.currencies import CURRENCIES
from payapp.keys import CODEC, SETTINGS
from payapp.validation import MAX_AMOUNT, MAX_PAYMENT_ID

JSON = "application/json"
Schema = dict[str, Any]

# Status -> the error codes a response with that status may carry (payapp.api's middleware and payapp.errors).
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("VALIDATION_ERROR",),
    401: ("UNAUTHORIZED",),
    404: ("NOT_FOUND",),
    405: ("METHOD_NOT_ALLOWED",),
    408: ("REQUEST_TIMEOUT",),
    409: ("INVALID_STATE", "REQUEST_IN_PROGRESS"),
    413: ("PAYLOAD_TOO_LARGE",),
    422: ("IDEMPOTENCY_CONFLICT",),
    429: ("RATE_LIMIT_EXCEEDED",),
    503: ("SERVICE_UNAVAILABLE",),
}
_ERROR_TEXT = {
    400: "Malformed JSON, wrong types, missing or out-of-range fields, unknown currency, bad path id.",
    401: "Missing or invalid API key, or a merchantId that is not the key's merchant.",
    404: "No such payment for this merchant (another merchant's payment is also 404, so ids do not leak).",
    408: "The request body did not arrive within PAYAPP_BODY_TIMEOUT seconds; the connection is then closed.",
    409: "INVALID_STATE: the payment's status or amounts forbid it (e.g. capture beyond the authorized amount). "
         "REQUEST_IN_PROGRESS: a request with the same idempotency key is still running.",
    413: f"The request body exceeds {MAX_BODY_BYTES // 1024} KB.",
    422: "The idempotency key was already used with different parameters.",
    429: "The merchant's per-minute budget for this action is spent; retry after Retry-After seconds.",
    503: "The database is unavailable, or the rate limiter is and PAYAPP_RATE_LIMIT_FAIL=closed.",
}
STATUSES = ("REQUESTED", "COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED", "CANCELLED")
# Identifiers (merchant ids, idempotency keys): printable ASCII is the documented contract (see the docstring).
_PRINTABLE_ASCII = "^[\\x20-\\x7e]*$"


def document(auth: str) -> Schema:
    """The OpenAPI document of a service running with ``PAYAPP_AUTH=auth`` ("off" or "apikey")."""
    apikey = auth == "apikey"
    paths: dict[str, Schema] = {
        "/payments/authorize": {"post": _authorize(apikey)},
        "/payments/capture/{paymentId}": {"post": _change("capture", apikey)},
        "/payments/refund/{paymentId}": {"post": _change("refund", apikey)},
        "/payments/void/{paymentId}": {"post": _change("void", apikey)},
        "/payments/{paymentId}": {"get": _get_payment(apikey)},
        "/health": {"get": _health()},
        "/metrics": {"get": _metrics()},
        "/openapi.json": {"get": _openapi()},
    }
    doc: Schema = {
        "openapi": "3.0.3",
        "info": {
            "title": "payapp payment API",
            "version": __version__,
            "description": (
                "Authorize, capture, refund and void card payments; amounts are integers in the currency's minor "
                "unit. Every error is `{code, message, paymentId?}`. Request bodies larger than "
                f"{MAX_BODY_BYTES} bytes are refused with 413. Every GET route also answers HEAD (aiohttp adds it). "
                "CORS preflights (OPTIONS with Origin and Access-Control-Request-Method) are answered for the "
                "origins in PAYAPP_CORS_ORIGINS on any path. "
                + ("Authentication: `Authorization: Bearer <key>` (PAYAPP_AUTH=apikey) decides the merchant."
                   if apikey else "Authentication is off (PAYAPP_AUTH=off): `merchantId` names the merchant.")
            ),
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if apikey:
        doc["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "The merchant's API key from `payapp merchant create`."},
        }
    return doc


@functools.cache
def _document_bytes(auth: str, dumps: Any) -> bytes:
    encoded: bytes = dumps(document(auth))
    return encoded


async def handler(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the description of this running service."""
    app = request.app
    body = _document_bytes(app[SETTINGS].auth, app[CODEC].dumps)
    return web.Response(body=body, headers={"Content-Type": JSON})


# --- components ---------------------------------------------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _identifier(max_len: int, description: str) -> Schema:
    return {"type": "string", "minLength": 1, "maxLength": max_len, "pattern": _PRINTABLE_ASCII,
            "description": description}


def _amount(description: str) -> Schema:
    return {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT, "description": description}


def _schemas() -> Schema:
    error_codes = sorted({code for codes in ERROR_CODES.values() for code in codes})
    schemas: Schema = {
        "Error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": error_codes},
                "message": {"type": "string"},
                "paymentId": {"type": "integer", "minimum": 1, "maximum": MAX_PAYMENT_ID},
            },
        },
        "LedgerEntry": {
            "type": "object",
            "required": ["operationId", "account", "direction", "amount", "currency", "createdAt"],
            "additionalProperties": False,
            "properties": {
                "operationId": {"type": "integer", "minimum": 1},
                "account": {"type": "string"},
                "direction": {"type": "string", "enum": ["DEBIT", "CREDIT"]},
                "amount": {"type": "integer", "minimum": 1},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "createdAt": {"type": "string", "format": "date-time"},
            },
        },
        "Payment": {
            "type": "object",
            "required": ["paymentId", "merchantId", "status", "amount", "capturedAmount", "refundedAmount",
                         "currency", "createdAt", "updatedAt", "ledgerEntries", "message"],
            "additionalProperties": False,
            "properties": {
                "paymentId": {"type": "integer", "minimum": 1, "maximum": MAX_PAYMENT_ID},
                "merchantId": {"type": "string", "minLength": 1, "maxLength": 32},
                "status": {"type": "string", "enum": list(STATUSES)},
                "amount": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT},
                "capturedAmount": {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
                "refundedAmount": {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "createdAt": {"type": "string", "format": "date-time"},
                "updatedAt": {"type": "string", "format": "date-time"},
                "ledgerEntries": {"type": "array", "items": _ref("LedgerEntry")},
                "message": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "db", "redis"],
            "additionalProperties": False,
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
                "db": {"type": "string", "enum": ["ok", "down"]},
                "redis": {"type": "string", "enum": ["ok", "down"]},
            },
        },
    }
    for status, codes in ERROR_CODES.items():
        schemas[f"Error{status}"] = {
            "allOf": [_ref("Error"), {"properties": {"code": {"enum": list(codes)}}}],
        }
    return schemas


# --- responses ----------------------------------------------------------------------------------------------------

_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored response of an earlier request with the same idempotency key.",
        "schema": {"type": "string", "enum": ["true"]},
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {"description": "The scheme to use.", "required": True,
                         "schema": {"type": "string", "enum": ["Bearer"]}},
}


def _error(status: int, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": _ERROR_TEXT[status],
        "content": {JSON: {"schema": _ref(f"Error{status}")}},
    }
    if headers:
        response["headers"] = headers
    return response


def _payment_response(description: str, links: tuple[str, ...] = ()) -> Schema:
    response: Schema = {"description": description, "headers": _REPLAYED,
                        "content": {JSON: {"schema": _ref("Payment")}}}
    if links:
        response["links"] = {name: _LINKS[name] for name in links}
    return response


# What a client may do next with the payment a response returned (stateful fuzzing follows these too).
_PAYMENT = {"paymentId": "$response.body#/paymentId"}
_MERCHANT = {"merchantId": "$response.body#/merchantId"}
_LINKS: dict[str, Schema] = {
    "GetPayment": {"operationId": "getPayment",
                   "parameters": {**_PAYMENT, "query.merchantId": _MERCHANT["merchantId"]}},
    "Capture": {"operationId": "capture", "parameters": _PAYMENT, "requestBody": _MERCHANT},
    "Void": {"operationId": "void", "parameters": _PAYMENT, "requestBody": _MERCHANT},
    "Refund": {"operationId": "refund", "parameters": _PAYMENT,
               "requestBody": {**_MERCHANT, "reason": "customer request"}},
}


def _errors(statuses: tuple[int, ...], apikey: bool, replayable: bool = False, write: bool = True) -> dict[str, Schema]:
    """Error responses of an operation; ``write`` ones read a body (408, 413) and are rate limited (429)."""
    out: dict[str, Schema] = {}
    for status in sorted({400, *((401,) if apikey else ()), *statuses, *((408, 413, 429) if write else ()), 503}):
        headers: Schema | None = None
        if status in (429, 503):
            headers = _RETRY_AFTER
        elif status == 401:
            headers = _WWW_AUTHENTICATE
        elif replayable and status in (404, 409):
            headers = _REPLAYED  # a business refusal is stored and replayed like a success
        out[str(status)] = _error(status, headers)
    return out


# --- operations ---------------------------------------------------------------------------------------------------


def _merchant_field(apikey: bool) -> Schema:
    if apikey:
        return {**_identifier(32, "Optional with an API key; when given it must be the key's merchant."),
                "nullable": True}
    return _identifier(32, "The merchant (PAYAPP_AUTH=off trusts it).")


def _security(op: Schema, apikey: bool) -> Schema:
    if apikey:
        op["security"] = [{"apiKey": []}]
    return op


def _body(properties: Schema, required: list[str], *, body_required: bool) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:  # OpenAPI 3.0 forbids an empty list
        schema["required"] = required
    return {"required": body_required, "content": {JSON: {"schema": schema}}}


def _authorize(apikey: bool) -> Schema:
    properties = {
        "merchantId": _merchant_field(apikey),
        "amount": _amount("Integer in the currency's minor unit (KRW has none)."),
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "enum": sorted(CURRENCIES),
                     "description": "ISO 4217 code (lower case is accepted and upper-cased)."},
        "idempotencyKey": _identifier(64, "The same (merchant, key) with the same parameters replays the first "
                                          "response; with different parameters it is 422."),
    }
    required = ["amount", "currency", "idempotencyKey"] + ([] if apikey else ["merchantId"])
    return _security({
        "operationId": "authorize",
        "summary": "Authorize a payment (status REQUESTED)",
        "requestBody": _body(properties, required, body_required=True),
        "responses": {
            "200": _payment_response("Authorized, or the replay of an earlier authorize with the same key.",
                                     ("GetPayment", "Capture", "Void")),
            **_errors((409, 422), apikey),
        },
    }, apikey)


_PAYMENT_ID: Schema = {
    "name": "paymentId",
    "in": "path",
    "required": True,
    "description": "Non-digits are 400; ids no payment can have (0, > 2^63-1) are 404.",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAYMENT_ID},
}
_IDEMPOTENCY_KEY: Schema = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retrying with the same key never captures, refunds or voids twice.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": _PRINTABLE_ASCII},
}
_CHANGE_TEXT = {
    "capture": ("Capture all or part of the authorized amount (status COMPLETED)",
                "Amount to capture; default: all that is not captured yet."),
    "refund": ("Refund all or part of the captured amount (REFUNDED or PARTIALLY_REFUNDED)",
               "Amount to refund; default: all that is captured and not refunded yet."),
    "void": ("Cancel an authorized, uncaptured payment (status CANCELLED)", ""),
}


def _change(action: str, apikey: bool) -> Schema:
    summary, amount_text = _CHANGE_TEXT[action]
    properties: Schema = {"merchantId": _merchant_field(apikey)}
    required = [] if apikey else ["merchantId"]
    if action != "void":
        properties["amount"] = {**_amount(amount_text), "nullable": True}
    if action == "refund":
        properties["reason"] = {"type": "string", "minLength": 1, "maxLength": 128}
        required.append("reason")
    return _security({
        "operationId": action,
        "summary": summary,
        "parameters": [_PAYMENT_ID, _IDEMPOTENCY_KEY],
        "requestBody": _body(properties, required, body_required=bool(required)),
        "responses": {
            "200": _payment_response("Done, or the replay of an earlier request with the same Idempotency-Key.",
                                     ("GetPayment", "Capture", "Refund") if action != "void" else ("GetPayment",)),
            **_errors((404, 409, 422), apikey, replayable=True),
        },
    }, apikey)


def _get_payment(apikey: bool) -> Schema:
    merchant = {
        "name": "merchantId",
        "in": "query",
        "required": not apikey,
        "schema": _identifier(32, "The merchant the payment belongs to."),
    }
    return _security({
        "operationId": "getPayment",
        "summary": "A payment with its status, captured and refunded amounts and all ledger entries",
        "parameters": [_PAYMENT_ID, merchant],
        "responses": {"200": _payment_response("The payment."), **_errors((404,), apikey, write=False)},
    }, apikey)


def _health() -> Schema:
    content = {JSON: {"schema": _ref("Health")}}
    return {
        "operationId": "health",
        "summary": "MariaDB and Redis reachability",
        "responses": {
            "200": {"description": "Serving (`degraded`: Redis is down and the limiter fails open).",
                    "content": content},
            "503": {"description": "Not serving: MariaDB is down (or Redis, when the limiter fails closed).",
                    "content": content},
        },
    }


def _metrics() -> Schema:
    return {
        "operationId": "metrics",
        "summary": "Prometheus metrics, totals across all worker processes",
        "responses": {"200": {"description": "Prometheus text format.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }


def _openapi() -> Schema:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.0.", "content": {JSON: {"schema": {"type": "object"}}}}},
    }
