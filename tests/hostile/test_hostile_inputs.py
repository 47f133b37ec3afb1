"""Hand-written hostile requests against create_app in this process (real MariaDB and Redis).

Each one must end as the documented error (status, ``{code, message, paymentId?}``, no traceback) or, where the
input is odd but legal, as a correct success; never a 5xx. Afterwards the database still holds only what the
legal requests created.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import payload
from aiohttp.test_utils import TestClient

from payapp.settings import Settings
from payapp.validation import MAX_AMOUNT
from tests.app.conftest import AppDatabase, app_client, merchant
from tests.hostile.conftest import authorize, expect_error

Client = TestClient[Any, Any]


def auth_body(m: str, **fields: Any) -> dict[str, Any]:
    return {"merchantId": m, "amount": 1000, "currency": "KRW", "idempotencyKey": uuid.uuid4().hex, **fields}


async def post_raw(client: Client, path: str, raw: bytes, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> Any:
    return await client.post(path, data=raw, headers={"Content-Type": content_type, **(headers or {})})


@pytest.fixture(scope="module", params=["orjson", "stdlib"])
async def any_codec_client(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Client]:
    """The app with each JSON library PAYAPP_JSON can choose: both must refuse the same inputs the same way."""
    from dataclasses import replace

    async with app_client(replace(settings, json_lib=request.param)) as c:
        yield c


# --- malformed, huge and deeply nested JSON ------------------------------------------------------------------------

DEPTH = 3000  # far beyond both parsers' limits (orjson 1024, the stdlib's recursion limit), still < 16 KB


@pytest.mark.parametrize("raw", [
    b"{", b"}", b'{"merchantId": }', b"{'merchantId': 'm'}", b"nul", b"null", b"true", b"0", b"[]", b'"x"',
    b'{"a": 1,}', b"{}{}", b"\x00", b"\xef\xbb\xbf{}", b"\xff\xfe\x00{", b'{"amount": NaN}', b'{"amount": Infinity}',
    b'{"merchantId": "m", "amount": 1000, "currency": "KRW", "idempotencyKey": "\xff\xfe"}',
    b"[" * DEPTH + b"]" * DEPTH,
    b'{"":' * DEPTH + b"1" + b"}" * DEPTH,
    b'{"merchantId": ' + b'{"":' * DEPTH + b"1" + b"}" * DEPTH + b"}",
    b'{"merchantId": "m", "amount": 1000, "currency": "KRW", "idempotencyKey": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
], ids=lambda raw: repr(raw[:24]))
async def test_malformed_or_deeply_nested_json_is_400(any_codec_client: Client, raw: bytes) -> None:
    for path in ("/payments/authorize", "/payments/capture/1", "/payments/refund/1", "/payments/void/1"):
        await expect_error(await post_raw(any_codec_client, path, raw), 400, "VALIDATION_ERROR")


async def test_wide_json_within_the_size_limit_is_400_for_its_fields(client: Client) -> None:
    wide = {f"k{i}": [i] * 3 for i in range(500)}
    raw = json.dumps({**auth_body(merchant()), **wide, "amount": "lots"}).encode()
    assert len(raw) < 16 * 1024
    await expect_error(await post_raw(client, "/payments/authorize", raw), 400, "VALIDATION_ERROR")


async def test_oversized_bodies_are_413_with_or_without_content_length(client: Client) -> None:
    big = json.dumps(auth_body(merchant(), pad="x" * 40_000)).encode()
    for path in ("/payments/authorize", "/payments/capture/1", "/payments/refund/1", "/payments/void/1"):
        await expect_error(await post_raw(client, path, big), 413, "PAYLOAD_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse early
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    resp = await client.post("/payments/authorize", data=payload.AsyncIterablePayload(chunks()),
                             headers={"Content-Type": "application/json"})
    await expect_error(resp, 413, "PAYLOAD_TOO_LARGE")
    # A megabyte is refused the same way, and the service still answers afterwards.
    await expect_error(await post_raw(client, "/payments/authorize", b"[" * 1_000_000), 413, "PAYLOAD_TOO_LARGE")
    assert (await client.get("/health")).status == 200


async def test_empty_bodies(client: Client) -> None:
    m = merchant()
    pid = await authorize(client, m)
    for path in ("/payments/authorize", f"/payments/capture/{pid}", f"/payments/refund/{pid}",
                 f"/payments/void/{pid}"):
        for raw in (b"", b"   \r\n\t"):
            # authorize needs its fields; with PAYAPP_AUTH=off the others need merchantId: both 400
            await expect_error(await post_raw(client, path, raw), 400, "VALIDATION_ERROR")
    resp = await client.post("/payments/authorize")  # no body, no Content-Type at all
    await expect_error(resp, 400, "VALIDATION_ERROR")


# --- content types -------------------------------------------------------------------------------------------------


async def test_non_json_bodies_are_400_whatever_the_content_type(client: Client) -> None:
    m = merchant()
    form = f"merchantId={m}&amount=1000&currency=KRW&idempotencyKey=k1".encode()
    for raw, content_type in [
        (form, "application/x-www-form-urlencoded"),
        (b"--b\r\nContent-Disposition: form-data; name=\"merchantId\"\r\n\r\nm\r\n--b--\r\n",
         "multipart/form-data; boundary=b"),
        (b"<payment><amount>1000</amount></payment>", "application/xml"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (b"merchantId: m\namount: 1000\n", "application/yaml"),
    ]:
        await expect_error(await post_raw(client, "/payments/authorize", raw, content_type), 400, "VALIDATION_ERROR")


async def test_a_json_body_under_another_content_type_is_read_as_json(client: Client, app_db: AppDatabase) -> None:
    """The body decides, not the header (documented in docs/security.md): the same request, the same result."""
    m = merchant()
    for content_type in ("text/plain", "application/octet-stream", "application/json; charset=latin-1"):
        resp = await post_raw(client, "/payments/authorize", json.dumps(auth_body(m)).encode(), content_type)
        assert resp.status == 200, await resp.text()
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{m}'") == 3


# --- amounts -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [
    "-1", "0", "-0", str(2**63 - 1), str(2**63), str(2**64), str(10**30), str(-(2**63) - 1), str(MAX_AMOUNT + 1),
    "1.5", "100.0", "1e3", "1E400", "-1e-400", '"100"', '"1e3"', '""', "true", "false", "[100]", '{"v": 100}',
    "0x10", "+1", "01",
])
async def test_bad_amounts_are_400_everywhere(client: Client, app_db: AppDatabase, amount: str) -> None:
    m = merchant()
    pid = await authorize(client, m, amount=5000)
    await authorize(client, m, amount=5000)  # a second payment, captured, so refund has something to refuse
    captured = await authorize(client, m, amount=5000)
    assert (await client.post(f"/payments/capture/{captured}", json={"merchantId": m})).status == 200
    before = app_db.scalar("SELECT COUNT(*) FROM ledger_entry")
    template = '{"merchantId": "%s", "amount": %s, "currency": "KRW", "idempotencyKey": "%s", "reason": "r"}'
    for path in ("/payments/authorize", f"/payments/capture/{pid}", f"/payments/refund/{captured}"):
        raw = (template % (m, amount, uuid.uuid4().hex)).encode()
        await expect_error(await post_raw(client, path, raw), 400, "VALIDATION_ERROR")
    assert app_db.scalar("SELECT COUNT(*) FROM ledger_entry") == before


async def test_the_largest_amount_is_accepted_and_one_more_is_not(client: Client) -> None:
    m = merchant()
    resp = await client.post("/payments/authorize", json=auth_body(m, amount=MAX_AMOUNT))
    assert resp.status == 200 and (await resp.json())["amount"] == MAX_AMOUNT
    pid = (await resp.json())["paymentId"]
    resp = await client.post(f"/payments/capture/{pid}", json={"merchantId": m, "amount": MAX_AMOUNT})
    assert resp.status == 200 and (await resp.json())["capturedAmount"] == MAX_AMOUNT
    await expect_error(await client.post("/payments/authorize", json=auth_body(m, amount=MAX_AMOUNT + 1)),
                       400, "VALIDATION_ERROR")


# --- identifiers: unicode, control characters, NUL, SQL-ish strings ---------------------------------------------------


@pytest.mark.parametrize("bad", [
    "m\u0000", "\u0000", "m\x07", "m\n", "m\r\nX-Injected: 1", "m\t", "\x1b[31mred", "m\x7f", "m\u0085", "m\u2028",
    "m\u202e", "m\ufeff", "m\u200b",
])
async def test_control_and_invisible_characters_in_ids_are_400(client: Client, app_db: AppDatabase, bad: str) -> None:
    before = app_db.scalar("SELECT COUNT(*) FROM payment")
    for field in ("merchantId", "idempotencyKey"):
        body = auth_body(merchant(), **{field: bad})
        await expect_error(await client.post("/payments/authorize", json=body), 400, "VALIDATION_ERROR")
    resp = await client.get("/payments/1", params={"merchantId": bad})
    await expect_error(resp, 400, "VALIDATION_ERROR")
    assert app_db.scalar("SELECT COUNT(*) FROM payment") == before


async def test_lone_surrogates_in_ids_are_400(client: Client) -> None:
    for escaped in ("\\ud800", "m\\udfff", "\\udbff\\udbff"):
        raw = f'{{"merchantId": "{escaped}", "amount": 1, "currency": "KRW", "idempotencyKey": "k"}}'.encode()
        await expect_error(await post_raw(client, "/payments/authorize", raw), 400, "VALIDATION_ERROR")
    resp = await client.get("/payments/1?merchantId=%ED%A0%80")  # a surrogate, UTF-8 encoded (invalid UTF-8)
    assert resp.status in (400, 404), await resp.text()
    await expect_error(resp, resp.status, "VALIDATION_ERROR" if resp.status == 400 else "NOT_FOUND")


@pytest.mark.parametrize("merchant_id", [
    "mérchant-ünïcode", "商户-一号", "💳💸", "Ω" * 32, "' OR '1'='1", "1; DROP TABLE payment; --", "m\\", "%", "_",
    "m' -- ", "\"quoted\"", "${jndi:ldap://x}", "{{7*7}}", "<script>", "../../etc/passwd", " padded ",
])
async def test_odd_but_printable_ids_are_stored_verbatim_and_scope_exactly(
        client: Client, app_db: AppDatabase, merchant_id: str) -> None:
    """Unicode and SQL-/template-looking ids are data: stored byte for byte, matched exactly, never interpreted."""
    tables = app_db.scalar("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()")
    key = merchant_id[::-1] + uuid.uuid4().hex[:8]
    resp = await client.post("/payments/authorize", json=auth_body(merchant_id, idempotencyKey=key))
    data = await resp.json()
    assert resp.status == 200, data
    assert data["merchantId"] == merchant_id
    pid = data["paymentId"]
    resp = await client.get(f"/payments/{pid}", params={"merchantId": merchant_id})
    assert resp.status == 200 and (await resp.json())["merchantId"] == merchant_id
    # Near-misses do not match: SQL wildcards, trailing spaces, case, a prefix.
    near = {merchant_id + " ", merchant_id.upper(), merchant_id[:-1] or "x", "%", "_", "' OR '1'='1"}
    for other in {n for n in near if len(n) <= 32} - {merchant_id}:
        await expect_error(await client.get(f"/payments/{pid}", params={"merchantId": other}), 404, "NOT_FOUND")
    # The same key replays rather than re-running anything.
    again = await client.post("/payments/authorize", json=auth_body(merchant_id, idempotencyKey=key))
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert app_db.scalar("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()") == tables


# --- path ids ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/payments/..%2f..", 400, "VALIDATION_ERROR"),
    ("/payments/..%2F..%2Fhealth", 400, "VALIDATION_ERROR"),
    ("/payments/%2e%2e", 404, "NOT_FOUND"),  # the URL parser resolves the dot segments: /
    ("/payments/abc", 400, "VALIDATION_ERROR"),
    ("/payments/1abc", 400, "VALIDATION_ERROR"),
    ("/payments/-1", 400, "VALIDATION_ERROR"),
    ("/payments/+1", 400, "VALIDATION_ERROR"),
    ("/payments/1.0", 400, "VALIDATION_ERROR"),
    ("/payments/1e3", 400, "VALIDATION_ERROR"),
    ("/payments/0x1", 400, "VALIDATION_ERROR"),
    ("/payments/%20%31", 400, "VALIDATION_ERROR"),
    ("/payments/1%00", 400, "VALIDATION_ERROR"),
    ("/payments/%00", 400, "VALIDATION_ERROR"),
    ("/payments/%EF%BC%91", 400, "VALIDATION_ERROR"),  # fullwidth digit one: a digit, not ASCII
    ("/payments/%D9%A1", 400, "VALIDATION_ERROR"),  # Arabic-Indic one
    ("/payments/%ff", 400, "VALIDATION_ERROR"),  # not UTF-8
    ("/payments/1'%20OR%20'1'='1", 400, "VALIDATION_ERROR"),
    ("/payments/0", 404, "NOT_FOUND"),
    ("/payments/00000000000000000000001", 404, "NOT_FOUND"),
    (f"/payments/{2**63}", 404, "NOT_FOUND"),
    (f"/payments/{2**64 + 1}", 404, "NOT_FOUND"),
    ("/payments/" + "9" * 5000, 404, "NOT_FOUND"),
    ("/payments/", 404, "NOT_FOUND"),
    ("/payments/1/2", 404, "NOT_FOUND"),
    ("/payments/../../etc/passwd", 404, "NOT_FOUND"),
    ("/%2e%2e/%2e%2e/etc/passwd", 404, "NOT_FOUND"),
])
async def test_hostile_path_ids(client: Client, path: str, status: int, code: str) -> None:
    m = merchant()
    resp = await client.get(path + f"?merchantId={m}", allow_redirects=False)
    await expect_error(resp, status, code)
    if path.startswith("/payments/") and path.count("/") == 2:
        action = path.replace("/payments/", "/payments/capture/", 1)
        resp = await client.post(action, json={"merchantId": m}, allow_redirects=False)
        await expect_error(resp, status, code)


# --- duplicate keys, unknown fields, wrong methods -------------------------------------------------------------------


async def test_duplicate_keys_take_the_last_value_consistently(client: Client, app_db: AppDatabase) -> None:
    """JSON with a key twice: one parse decides every use of the value (validation, storage, idempotency)."""
    m, decoy = merchant(), merchant()
    key = uuid.uuid4().hex
    raw = (f'{{"merchantId": "{decoy}", "amount": 1, "amount": 700, "currency": "USD", "currency": "KRW",'
           f' "idempotencyKey": "{key}", "merchantId": "{m}"}}').encode()
    resp = await post_raw(client, "/payments/authorize", raw)
    data = await resp.json()
    assert resp.status == 200, data
    assert (data["merchantId"], data["amount"], data["currency"]) == (m, 700, "KRW")
    rows = app_db.rows(f"SELECT merchant_id, amount, currency FROM payment WHERE payment_id = {data['paymentId']}")
    assert rows == [[m, "700", "KRW"]]
    assert app_db.scalar(f"SELECT COUNT(*) FROM payment WHERE merchant_id = '{decoy}'") == 0
    # The replay key is the parsed request: the same duplicates replay, the plain equivalent replays too.
    again = await post_raw(client, "/payments/authorize", raw)
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
    plain = await client.post("/payments/authorize", json=auth_body(m, amount=700, idempotencyKey=key))
    assert plain.status == 200 and (await plain.json())["paymentId"] == data["paymentId"]
    # A duplicated amount that breaks a rule is refused, whichever value is first.
    raw = f'{{"merchantId": "{m}", "amount": 5, "amount": -5, "currency": "KRW", "idempotencyKey": "k2"}}'.encode()
    await expect_error(await post_raw(client, "/payments/authorize", raw), 400, "VALIDATION_ERROR")


async def test_unknown_fields_cannot_set_server_owned_values(client: Client, app_db: AppDatabase) -> None:
    m = merchant()
    body = auth_body(m, status="COMPLETED", capturedAmount=1000, paymentId=1, payment_id=1, ledgerEntries=[],
                     createdAt="2000-01-01T00:00:00Z", refundedAmount=5)
    resp = await client.post("/payments/authorize", json=body)
    data = await resp.json()
    assert resp.status == 200, data
    assert (data["status"], data["capturedAmount"], data["refundedAmount"]) == ("REQUESTED", 0, 0)
    assert not data["createdAt"].startswith("2000")


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/payments/authorize"), ("DELETE", "/payments/1"), ("PATCH", "/payments/capture/1"),
    ("GET", "/payments/capture/1"), ("POST", "/health"), ("POST", "/metrics"), ("POST", "/openapi.json"),
    ("TRACE", "/payments/1"), ("PROPFIND", "/payments/authorize"),
])
async def test_wrong_methods_are_405_with_allow(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path, json={"merchantId": "m"})
    await expect_error(resp, 405, "METHOD_NOT_ALLOWED")
    assert resp.headers.get("Allow"), "RFC 9110: a 405 must say which methods are allowed"


async def test_hostile_headers(client: Client) -> None:
    m = merchant()
    pid = await authorize(client, m)
    for key in ("k" * 65, "", "   "):  # control characters need a raw socket: test_raw_http
        resp = await client.post(f"/payments/capture/{pid}", json={"merchantId": m},
                                 headers={"Idempotency-Key": key})
        await expect_error(resp, 400, "VALIDATION_ERROR")
    # Nothing above captured the payment.
    resp = await client.get(f"/payments/{pid}", params={"merchantId": m})
    assert (await resp.json())["capturedAmount"] == 0
