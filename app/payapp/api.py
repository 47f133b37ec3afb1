"""HTTP layer: routes, request parsing, one middleware for errors, CORS and metrics. No business rules here.

Per request: JSON body -> merchant (``PAYAPP_AUTH``) -> field validation -> rate limit -> ``payapp.payments``.
Every failure leaves as ``{code, message, paymentId?}``: ApiError as itself, aiohttp's own 404/405/413 mapped to
NOT_FOUND / METHOD_NOT_ALLOWED / PAYLOAD_TOO_LARGE, database trouble as 503 SERVICE_UNAVAILABLE, anything else as
500 INTERNAL_ERROR with the traceback in the log only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncmy
from aiohttp import web

from payapp import validation
from payapp.db import BatchError, execute
from payapp.errors import ApiError
from payapp.keys import API_KEYS, CODEC, DB_POOL, LIMITER, METRICS, PAYMENTS, REDIS, SETTINGS
from payapp.metrics import CONTENT_TYPE
from payapp.payments import AuthorizeRequest, ChangeRequest, Outcome

log = logging.getLogger("payapp.api")

MAX_BODY_BYTES = 16 * 1024
JSON = "application/json"
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
_CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key"
_CORS_EXPOSE_HEADERS = "Retry-After, Idempotent-Replayed"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/payments/authorize", authorize)
    app.router.add_post("/payments/capture/{payment_id}", capture)
    app.router.add_post("/payments/refund/{payment_id}", refund)
    app.router.add_post("/payments/void/{payment_id}", void)
    app.router.add_get("/payments/{payment_id}", get_payment)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


# --- handlers ---------------------------------------------------------------------------------------------------


async def authorize(request: web.Request) -> web.Response:
    body = await _json_body(request, allow_empty=False)
    merchant_id = await _merchant(request, body.get("merchantId"))
    req = AuthorizeRequest(
        merchant_id=merchant_id,
        amount=validation.required_amount(body),
        currency=validation.currency(body),
        idempotency_key=validation.required_text(body, "idempotencyKey", 64),
    )
    await request.app[LIMITER].enforce("authorize", merchant_id)
    return _send(request, await request.app[PAYMENTS].authorize(req))


async def capture(request: web.Request) -> web.Response:
    return await _change(request, "CAPTURE", "capture")


async def refund(request: web.Request) -> web.Response:
    return await _change(request, "REFUND", "refund")


async def void(request: web.Request) -> web.Response:
    return await _change(request, "VOID", "void")


async def _change(request: web.Request, kind: str, action: str) -> web.Response:
    payment_id = validation.payment_id(request.match_info["payment_id"])
    body = await _json_body(request, allow_empty=True)
    merchant_id = await _merchant(request, body.get("merchantId"))
    req = ChangeRequest(
        kind=kind,
        merchant_id=merchant_id,
        payment_id=payment_id,
        amount=validation.amount(body, required=False) if kind != "VOID" else None,
        reason=validation.required_text(body, "reason", 128, identifier=False) if kind == "REFUND" else None,
        idempotency_key=validation.header_key(request.headers.get("Idempotency-Key")),
    )
    await request.app[LIMITER].enforce(action, merchant_id)
    return _send(request, await request.app[PAYMENTS].change(req))


async def get_payment(request: web.Request) -> web.Response:
    payment_id = validation.payment_id(request.match_info["payment_id"])
    merchant_id = await _merchant(request, request.query.get("merchantId"))
    return _send(request, await request.app[PAYMENTS].get(merchant_id, payment_id))


async def health(request: web.Request) -> web.Response:
    """200 when MariaDB answers (Redis down is 'degraded' while the limiter fails open), else 503."""
    app = request.app

    async def database() -> None:
        async with app[DB_POOL].acquire() as conn:
            await execute(conn, "SELECT 1")

    db_ok = await _probe(database(), 2.0)
    redis_ok = await _probe(app[REDIS].ping(), 0.5)
    fail_open = app[SETTINGS].rate_limit_fail == "open"
    if db_ok and redis_ok:
        status = "ok"
    elif db_ok and fail_open:
        status = "degraded"
    else:
        status = "unavailable"
    body = {"status": status, "db": "ok" if db_ok else "down", "redis": "ok" if redis_ok else "down"}
    return web.Response(body=app[CODEC].dumps(body), status=503 if status == "unavailable" else 200,
                        headers={"Content-Type": JSON})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


# --- request parsing --------------------------------------------------------------------------------------------


async def _json_body(request: web.Request, *, allow_empty: bool) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout):  # a stalled body must not hold the socket
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "REQUEST_TIMEOUT", "the request body did not arrive in time") from None
    if allow_empty and not raw.strip():
        return {}
    return validation.json_object(raw, request.app[CODEC].loads)


async def _merchant(request: web.Request, claimed: object) -> str:
    """The merchant a request acts for: its merchantId (PAYAPP_AUTH=off) or its API key's (apikey)."""
    app = request.app
    fields = {"merchantId": claimed}
    if app[SETTINGS].auth == "off":
        return validation.required_text(fields, "merchantId", 32)
    named = validation.text(fields, "merchantId", 32, required=False)
    return await app[API_KEYS].merchant_for(request.headers.get("Authorization"), named)


def _send(request: web.Request, outcome: Outcome) -> web.Response:
    headers = {"Content-Type": JSON}
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
        request.app[METRICS].idempotent_replays.labels(_route(request)).inc()
    return web.Response(body=outcome.body, status=outcome.status, headers=headers)


async def _probe(check: Awaitable[Any], timeout: float) -> bool:
    try:
        await asyncio.wait_for(check, timeout)
        return True
    except Exception:
        return False


# --- the middleware ---------------------------------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    app = request.app
    origin = request.headers.get("Origin")
    if origin is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = _preflight(app, origin)
    else:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error(app, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                response = _error(app, _too_large())
            else:
                code = _HTTP_CODES.get(exc.status, f"HTTP_{exc.status}")
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # a 405 must name them
                response = _error(app, ApiError(exc.status, code, exc.reason, headers=allow))
        except (BatchError, asyncmy.errors.MySQLError, OSError, EOFError) as exc:
            # OSError: refused/reset connections; EOFError: asyncio.IncompleteReadError, a server connection cut
            # mid-reply (e.g. closed by the query timeout while MariaDB waits on a full disk). Both are the database
            # being unavailable, not a bug of this request.
            log.warning("%s %s: database unavailable: %s", request.method, request.path, exc)
            response = _error(app, ApiError(503, "SERVICE_UNAVAILABLE", "database unavailable; retry later",
                                            headers={"Retry-After": "1"}))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = _error(app, ApiError(500, "INTERNAL_ERROR", "internal error"))
    if origin is not None:
        _allow_origin(app, origin, response)
    app[METRICS].observe(_route(request), request.method, response.status, time.perf_counter() - started)
    return response


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _error(app: web.Application, exc: ApiError) -> web.Response:
    headers = {"Content-Type": JSON, **exc.headers}
    return web.Response(body=app[CODEC].dumps(exc.body()), status=exc.status, headers=headers)


def _too_large() -> ApiError:
    return ApiError(413, "PAYLOAD_TOO_LARGE", "request body exceeds 16 KB")


def _origin_allowed(app: web.Application, origin: str) -> str | None:
    """The Access-Control-Allow-Origin value for ``origin``, or None when it may not call the API."""
    origins = app[SETTINGS].cors_origins
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _allow_origin(app: web.Application, origin: str, response: web.StreamResponse) -> None:
    allowed = _origin_allowed(app, origin)
    response.headers["Vary"] = "Origin"
    if allowed is not None:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE_HEADERS


def _preflight(app: web.Application, origin: str) -> web.Response:
    response = web.Response(status=204)
    if _origin_allowed(app, origin) is not None:
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = _CORS_ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    return response
