"""Attacks on the request head of a real `tollgate serve`, over raw sockets: oversized and
too many header fields, slowloris, idle sockets, a connection flood and chunked trailers.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_client import Admin
from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id, running_stack
from tests.servers import RedisServer, proxy_server, tollgate_env, wait_for

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 50
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def head_stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Default head limits, a 1-second head timeout."""
    spool = tmp_path_factory.mktemp("spool")
    with running_stack(
        redis_store, mock, spool, TOLLGATE_HEADER_TIMEOUT=str(HEADER_TIMEOUT_S)
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def capped_stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """At most 50 connections; a head timeout long enough not to close the held ones."""
    spool = tmp_path_factory.mktemp("spool")
    with running_stack(
        redis_store,
        mock,
        spool,
        TOLLGATE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        TOLLGATE_HEADER_TIMEOUT="60",
    ) as stack:
        yield stack


def _connect(stack: Stack, *, timeout_s: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=timeout_s)


def _rss_mib(stack: Stack) -> float:
    assert stack.proxy.process is not None
    status = Path(f"/proc/{stack.proxy.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length (what the proxy sends for errors)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """True when the server ends the connection (EOF or reset) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = max(0.0, deadline - time.monotonic())
        if not select.select([sock], [], [], left)[0]:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True


def _chat_head(secret: str, request_id: str, body: bytes, extra: list[str]) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {secret}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Request-Id: {request_id}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_head_over_the_byte_limit_is_answered_431_and_a_large_body_is_not(
    head_stack: Stack,
) -> None:
    key = head_stack.admin.create_key(name="head-bytes")
    request_id = new_request_id()
    messages = [{"role": "user", "content": "x" * 2_000_000}]
    body = json.dumps({"model": "gpt-4o-mini", "messages": messages}).encode()
    near_limit = _chat_head(key["key"], request_id, body, [f"X-Pad: {'p' * 60_000}"])
    with _connect(head_stack) as sock:
        sock.sendall(near_limit + body)  # head and body in one write, past the head limit
        status, _, _ = _read_response(sock)
    assert status == 200
    assert head_stack.mock.request_with_id(request_id)["path"] == "/v1/chat/completions"

    with _connect(head_stack) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        status, headers, answer = _read_response(sock)
        assert status == 431
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        error = json.loads(answer)["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "request_header_fields_too_large"
        assert error["param"] is None
        assert "65536 bytes" in error["message"]
        assert _closed_within(sock, 5)


def test_header_sent_slowly_is_cut_off_long_before_2_mb(head_stack: Stack) -> None:
    sent = 0
    with _connect(head_stack) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        piece = b"a" * 16384
        try:
            while sent < 2 * MIB:
                sock.sendall(piece)
                sent += len(piece)
                time.sleep(0.002)
        except ConnectionError:
            pass
        else:
            assert _closed_within(sock, 5)
    assert sent < MIB, f"the proxy was still reading after {sent} bytes of one header"


def test_four_connections_pushing_50_mb_headers_leave_rss_bounded(head_stack: Stack) -> None:
    before = _rss_mib(head_stack)
    peak = [before]
    sent = [0] * 4
    done = threading.Event()

    def push(i: int) -> None:
        piece = b"a" * 65536
        with _connect(head_stack) as sock:
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while sent[i] < 50 * MIB:
                    sock.sendall(piece)
                    sent[i] += len(piece)
            except (ConnectionError, TimeoutError):
                pass

    threads = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(head_stack))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    sampler.join(timeout=5)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a pusher was still sending after 60 s"
    assert max(sent) < 8 * MIB, f"bytes pushed before the proxy closed: {sent}"
    assert peak[0] - before < 50, f"RSS {before:.0f} -> {peak[0]:.0f} MiB in {elapsed:.1f} s"


def _send_headers(stack: Stack, key: dict[str, Any], count: int) -> tuple[int, str]:
    """A chat request with exactly `count` header fields; its status and request id."""
    request_id = new_request_id()
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    fillers = [f"X-Filler-{i}: {i}" for i in range(count - 5)]  # _chat_head writes 5 fields
    with _connect(stack) as sock:
        sock.sendall(_chat_head(key["key"], request_id, body, fillers) + body)
        status, _, _ = _read_response(sock)
    return status, request_id


def test_101_header_fields_are_refused_and_100_reach_the_upstream(head_stack: Stack) -> None:
    key = head_stack.admin.create_key(name="header-count")
    status, refused_id = _send_headers(head_stack, key, 101)
    assert status == 431
    status, request_id = _send_headers(head_stack, key, 100)
    assert status == 200
    assert head_stack.mock.request_with_id(request_id)["path"] == "/v1/chat/completions"
    assert not [
        r for r in head_stack.mock.received() if r["headers"].get("x-request-id") == refused_id
    ]


def test_slowloris_head_is_closed_after_the_header_timeout(head_stack: Stack) -> None:
    with _connect(head_stack) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed_after = None
        for i in range(50):  # one header field every 0.2 s, for at most 10 s
            try:
                sock.sendall(f"X-Drip-{i}: {i}\r\n".encode())
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            if _closed_within(sock, 0.2):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "a trickled head was still open after 10 s"
    assert closed_after < HEADER_TIMEOUT_S + 2


def test_idle_connection_is_closed_after_the_header_timeout(head_stack: Stack) -> None:
    with _connect(head_stack) as sock:
        started = time.monotonic()
        assert _closed_within(sock, 10), "an idle connection was still open after 10 s"
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2


def test_trailer_fields_never_reach_the_upstream(head_stack: Stack) -> None:
    key = head_stack.admin.create_key(name="trailers")
    request_id = new_request_id()
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    head = _chat_head(key["key"], request_id, body, ["Transfer-Encoding: chunked"])
    head = head.replace(f"Content-Length: {len(body)}\r\n".encode(), b"")
    chunked = b"%x\r\n%s\r\n0\r\nX-Smuggled: yes\r\nOpenAI-Beta: smuggled\r\n\r\n" % (
        len(body),
        body,
    )
    with _connect(head_stack) as sock:
        sock.sendall(head + chunked)
        status, _, _ = _read_response(sock)
    assert status == 200
    received = head_stack.mock.request_with_id(request_id)["headers"]
    assert "x-smuggled" not in received
    assert received.get("openai-beta") != "smuggled"


def test_keep_alive_connection_serves_again_then_closes_after_the_header_timeout(
    head_stack: Stack,
) -> None:
    with _connect(head_stack) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = _read_response(sock)
            assert status == 200
            assert headers.get("connection") != "close"
        answered = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next head, never finished
        assert _closed_within(sock, 10), "an unfinished keep-alive head was open after 10 s"
        assert time.monotonic() - answered < HEADER_TIMEOUT_S + 2


def test_every_worker_of_workers_2_enforces_the_limits(
    redis_store: RedisServer, mock: Mock, tmp_path: Path
) -> None:
    env = tollgate_env(
        redis_url=redis_store.url,
        upstream_url=mock.url,
        spool_dir=tmp_path / "spool",
        TOLLGATE_HEADER_TIMEOUT="1",
    )
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]
    with proxy_server(env=env, args=args) as proxy:
        stack = Stack(redis=redis_store, mock=mock, proxy=proxy, admin=Admin(proxy.url))
        try:
            for _ in range(4):  # connections are spread over both workers
                with _connect(stack) as sock:
                    fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(101))
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
                    assert _read_response(sock)[0] == 431
            with _connect(stack) as sock:
                started = time.monotonic()
                assert _closed_within(sock, 10)
                assert time.monotonic() - started < HEADER_TIMEOUT_S + 2
            assert httpx.get(proxy.url + "/healthz", timeout=5).status_code == 200
        finally:
            stack.admin.client.close()


def test_connections_beyond_the_cap_are_closed_at_once(capped_stack: Stack) -> None:
    socks = [_connect(capped_stack) for _ in range(200)]
    try:
        held = list(socks)

        def refused_ones_closed() -> bool:
            held[:] = [s for s in held if not _closed_within(s, 0)]
            return len(held) <= MAX_CONNECTIONS

        wait_for(refused_ones_closed, timeout_s=10, what="connections over the cap to close")
        time.sleep(0.5)  # a held connection stays held
        assert len([s for s in held if not _closed_within(s, 0)]) >= MAX_CONNECTIONS - 5
    finally:
        for sock in socks:
            sock.close()

    def answers() -> bool:
        return httpx.get(capped_stack.url + "/healthz", timeout=2).status_code == 200

    wait_for(answers, timeout_s=10, what="a request after the flood")
