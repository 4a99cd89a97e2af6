"""ClientConnection under uvicorn with a tiny inline app: what the app sees of request heads
that are pipelined, split across writes or over the limits."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from proxy.config import Settings
from proxy.http_server import ClientConnection, HeadLimits, http_protocol

pytestmark = pytest.mark.anyio


@dataclass
class Seen:
    """What the inline app received: each request's headers and body."""

    requests: list[tuple[list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[int, Seen]]:
    seen = Seen()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.requests.append((list(scope["headers"]), body))
        answer = b"%d" % len(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(answer))]})  # fmt: skip
        await send({"type": "http.response.body", "body": answer})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=http_protocol(settings), lifespan="off",
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        port: int = server.servers[0].sockets[0].getsockname()[1]
        yield port, seen
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def exchange(port: int, data: bytes, *, responses: int) -> list[bytes]:
    """Send `data` in one write; the first line of each of `responses` answers, then EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        lines = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )  # fmt: skip
            await reader.readexactly(length)
            lines.append(head.split(b"\r\n")[0])
        return lines
    finally:
        writer.close()


def test_http_protocol_pickles_into_worker_processes() -> None:
    settings = Settings(max_header_bytes=4096, max_headers=20, header_timeout_s=2.5)
    protocol: Any = pickle.loads(pickle.dumps(http_protocol(settings)))
    assert protocol.func is ClientConnection
    assert protocol.keywords["limits"] == HeadLimits(
        max_bytes=4096, max_headers=20, timeout_s=2.5, max_connections=2048
    )


async def test_pipelined_requests_in_one_write_past_the_head_limit_are_all_answered() -> None:
    body = b"b" * 5000
    request = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body
    async with serving(Settings(max_header_bytes=1024)) as (port, seen):
        lines = await exchange(port, request * 3, responses=3)
    assert lines == [b"HTTP/1.1 200 OK"] * 3
    assert [received for _, received in seen.requests] == [body] * 3


async def test_head_split_across_writes_counts_every_byte() -> None:
    async with serving(Settings(max_header_bytes=1024)) as (port, seen):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nX: ")
        for _ in range(5):  # 5 x 300 bytes of one header value, past 1024 in the 4th write
            writer.write(b"v" * 300)
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert seen.requests == []


async def test_fields_past_the_count_in_the_same_write_never_reach_the_app() -> None:
    fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(9))
    async with serving(Settings(max_headers=8)) as (port, seen):
        lines = await exchange(port, b"GET / HTTP/1.1\r\n" + fields + b"\r\n", responses=1)
    assert lines == [b"HTTP/1.1 431 Request Header Fields Too Large"]
    assert seen.requests == []


async def test_chunked_trailer_fields_are_not_request_headers() -> None:
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Smuggled: yes\r\n\r\n"
    )
    async with serving(Settings()) as (port, seen):
        assert await exchange(port, request, responses=1) == [b"HTTP/1.1 200 OK"]
    [(headers, body)] = seen.requests
    assert body == b"abc"
    assert [name for name, _ in headers] == [b"host", b"transfer-encoding"]
