"""Raw sockets against a real ``payapp serve``: slow clients (slowloris) and HTTP the framing layer refuses.

The app's own timeouts are what is checked here (nginx adds its own in a deployment): a connection that never
finishes its headers is closed after PAYAPP_KEEPALIVE_TIMEOUT; one that sends its headers and then stalls in the
body gets 408 REQUEST_TIMEOUT after PAYAPP_BODY_TIMEOUT and is then closed. Stalled clients hold no database
connection and do not slow anyone else down.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from tests.app.conftest import ServeProcess, make_env, merchant, new_database, start_serve
from tests.hostile.conftest import check_error
from tests.support.services import MariaDB, Redis

KEEPALIVE = 2.0
BODY_TIMEOUT = 2.0
LINGER = 10.0  # aiohttp reads what is left of an unread body for up to this long, then closes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(mariadb: MariaDB, redis_server: Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    database = new_database(mariadb, "rawhttp")
    env = make_env(database.url, redis_server.url(), KEEPALIVE_TIMEOUT=KEEPALIVE, BODY_TIMEOUT=BODY_TIMEOUT)
    proc = start_serve(env, tmp_path_factory.mktemp("raw") / "serve.log", workers=1)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        mariadb.sql(f"DROP DATABASE IF EXISTS {database.name}")


def connect(server: ServeProcess, timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.x response (Content-Length framed, as payapp sends them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def wait_closed(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes the connection (it must, within ``within``)."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {within:.0f}s")
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def open_sockets(pid: int) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def authorize_quickly(server: ServeProcess) -> float:
    body = {"merchantId": merchant(), "amount": 100, "currency": "KRW", "idempotencyKey": "k"}
    started = time.monotonic()
    resp = requests.post(server.url + "/payments/authorize", json=body, timeout=5)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - started


HEAD = (b"POST /payments/authorize HTTP/1.1\r\nHost: payapp\r\nContent-Type: application/json\r\n"
        b"Content-Length: 120\r\n\r\n")


def test_a_client_stalling_in_its_headers_is_disconnected(server: ServeProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /payments/authorize HTTP/1.1\r\nHost: payapp\r\nContent-Ty")
        took = wait_closed(sock, KEEPALIVE + 5)
    assert took >= KEEPALIVE - 0.5
    assert authorize_quickly(server) < 2


def test_a_client_stalling_in_its_body_gets_408_then_is_disconnected(server: ServeProcess) -> None:
    with connect(server) as sock:
        sock.sendall(HEAD + b'{"merchantId": "m", "amo')
        started = time.monotonic()
        status, headers, body = read_response(sock)
        took = time.monotonic() - started
        check_error(status, body, headers.get("content-type", ""), 408, "REQUEST_TIMEOUT")
        assert BODY_TIMEOUT - 0.5 <= took <= BODY_TIMEOUT + 3, took
        wait_closed(sock, LINGER + 5)


def test_many_stalled_clients_do_not_block_others_and_are_all_freed(server: ServeProcess) -> None:
    worker = server.worker_pids()[0]
    baseline = open_sockets(worker)
    stalled = [connect(server) for _ in range(60)]
    try:
        for i, sock in enumerate(stalled):
            sock.sendall(HEAD + b'{"merchantId"' if i % 2 else b"POST /payments/authorize HTTP/1.1\r\nHost:")
        time.sleep(0.3)
        assert open_sockets(worker) >= baseline + 60
        # Everyone else is served as usual meanwhile.
        assert max(authorize_quickly(server) for _ in range(5)) < 1.0
        deadline = time.monotonic() + max(KEEPALIVE, BODY_TIMEOUT) + LINGER + 5
        for sock in stalled:
            wait_closed(sock, max(0.1, deadline - time.monotonic()))
    finally:
        for sock in stalled:
            sock.close()
    # The worker let go of every one of them.
    deadline = time.monotonic() + 5
    while open_sockets(worker) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_sockets(worker) <= baseline


def test_a_slow_but_steady_client_within_the_timeout_is_served(server: ServeProcess) -> None:
    body = json.dumps({"merchantId": merchant(), "amount": 100, "currency": "KRW", "idempotencyKey": "slow"})
    raw = body.encode()
    head = (f"POST /payments/authorize HTTP/1.1\r\nHost: payapp\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode()
    with connect(server) as sock:
        sock.sendall(head)
        for i in range(0, len(raw), len(raw) // 4 + 1):
            time.sleep(BODY_TIMEOUT / 8)
            sock.sendall(raw[i:i + len(raw) // 4 + 1])
        status, _, answer = read_response(sock)
    assert status == 200, answer


@pytest.mark.parametrize("raw", [
    b"POST /payments/capture/1 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /payments/capture/1 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /payments/capture/1 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /payments/1\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello on the plain port
    b"POST /payments/authorize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /payments/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /payments/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /payments/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n{}",
])
def test_http_the_parser_refuses_is_400_and_closed(server: ServeProcess, raw: bytes) -> None:
    """Framing errors never reach the app (aiohttp's parser answers them: plain text, not the JSON error shape —
    see docs/security.md); what matters is 400, no traceback, the connection closed, the service unharmed."""
    with connect(server, timeout=10) as sock:
        sock.sendall(raw)
        status, _, body = read_response(sock)
        assert status == 400, body
        assert b"Traceback" not in body and b'File "' not in body
        wait_closed(sock, 5)
    assert authorize_quickly(server) < 2


def test_non_utf8_header_values_reach_the_app_and_are_400(server: ServeProcess) -> None:
    body = json.dumps({"merchantId": merchant()}).encode()
    with connect(server, timeout=10) as sock:
        sock.sendall(b"POST /payments/capture/1 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\xff\xfeb\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                     + body)
        status, headers, answer = read_response(sock)
    check_error(status, answer, headers.get("content-type", ""), 400, "VALIDATION_ERROR")


def test_a_content_length_beyond_the_limit_is_413_before_the_body(server: ServeProcess) -> None:
    with connect(server, timeout=10) as sock:
        sock.sendall(b"POST /payments/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n{")
        started = time.monotonic()
        status, headers, answer = read_response(sock)
        assert time.monotonic() - started < 1
    check_error(status, answer, headers.get("content-type", ""), 413, "PAYLOAD_TOO_LARGE")
