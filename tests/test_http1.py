"""The HTTP/1.1 transport against real loopback servers that write scripted bytes, so each edge
case (framing, disconnects, pool limits, cancellation, TLS) is exact."""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.http1 import Http1Transport
from tests.servers import free_port, self_signed_certificate

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Both loops: uvicorn runs the proxy on uvloop when it is installed."""
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
TIMEOUTS = {"connect": 5.0, "pool": 5.0}


class Peer:
    """One accepted connection of the scripted server."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.closed = asyncio.Event()  # the handler ended and the socket is closed

    async def request(self) -> bytes:
        """One request's bytes (head, then a Content-Length body), or b"" at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        data = head + await self.reader.readexactly(length)
        self.server.requests.append(data)
        self.server.received.set()
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def client_closed(self) -> bool:
        """Wait for the client's EOF; True if nothing else arrived first."""
        with suppress(ConnectionError):
            return await self.reader.read() == b""
        return True


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []
        self.received = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.url = ""

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(self, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler task would be logged as an error by asyncio
        finally:
            writer.close()
            with suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            peer.closed.set()
            self.tasks.discard(task)


@asynccontextmanager
async def serving(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A loopback server running `handler` per connection; the test must end within 10 s."""
    server = Server(handler)
    listener = await asyncio.start_server(server.accept, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(10):
            yield server
    finally:
        listener.close()
        for task in list(server.tasks):
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await listener.wait_closed()


def answer(*responses: bytes) -> Handler:
    """Each request, on whichever connection, gets the next response in turn; a connection
    stays open until the client closes it."""
    replies = iter(responses)

    async def handle(peer: Peer) -> None:
        while await peer.request():
            await peer.send(next(replies))

    return handle


def keep_answering(response: bytes) -> Handler:
    async def handle(peer: Peer) -> None:
        while await peer.request():
            await peer.send(response)

    return handle


def request(method: str, url: str, **kwargs: Any) -> httpx.Request:
    timeouts = kwargs.pop("timeouts", TIMEOUTS)
    return httpx.Request(method, url, extensions={"timeout": timeouts}, **kwargs)


async def fetch(transport: Http1Transport, url: str, **kwargs: Any) -> tuple[int, bytes]:
    response = await transport.handle_async_request(request("POST", url, **kwargs))
    return response.status_code, await response.aread()


async def test_content_length_response_and_the_exact_request_bytes() -> None:
    reply = (
        b"HTTP/1.1 201 Created\r\nX-Custom-Header: Yes\r\ncontent-type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n" + b'{"ok":true}'
    )
    async with serving(answer(reply)) as server, Http1Transport() as transport:
        sent = request(
            "POST",
            server.url + "/v1/x?a=1&b=%20c",
            headers=[(b"X-Mixed-Case", b"v"), (b"authorization", b"Bearer k")],
            content=b'{"q":1}',
        )
        response = await transport.handle_async_request(sent)
        assert response.status_code == 201
        assert response.headers.raw == [
            (b"X-Custom-Header", b"Yes"),
            (b"content-type", b"application/json"),
            (b"Content-Length", b"11"),
        ]
        assert response.extensions["http_version"] == b"HTTP/1.1"
        assert await response.aread() == b'{"ok":true}'
        host = server.url.removeprefix("http://").encode()
        assert server.requests == [
            b"POST /v1/x?a=1&b=%20c HTTP/1.1\r\nHost: " + host + b"\r\nX-Mixed-Case: v\r\n"
            b'authorization: Bearer k\r\nContent-Length: 7\r\n\r\n{"q":1}'
        ]


async def test_chunked_body_is_streamed_as_it_arrives() -> None:
    second = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await second.wait()
        await peer.send(b"6\r\n world\r\n0\r\n\r\n")
        await peer.client_closed()

    async with serving(handle) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url + "/"))
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"hello"  # the server is still waiting for `second`
        second.set()
        assert [chunk async for chunk in chunks] == [b" world"]
        assert (transport.connections_in_use, transport.connections_idle) == (0, 1)


async def test_interim_and_bodiless_responses() -> None:
    replies = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        OK,
    )
    async with serving(answer(*replies)) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"hi")
        assert await fetch(transport, server.url) == (204, b"")
        assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 1


async def test_keep_alive_reuses_one_connection() -> None:
    async with serving(keep_answering(OK)) as server, Http1Transport() as transport:
        for _ in range(3):
            assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 1
        assert transport.connections_idle == 1


async def test_connection_close_from_the_server_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with serving(answer(closing, OK)) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"ok")
        assert transport.connections_idle == 0
        await server.peers[0].closed.wait()
        assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",  # all here, none read
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",  # 5 bytes still due
    ],
    ids=["unread", "partial"],
)
async def test_response_closed_before_its_end_is_not_reused(reply: bytes) -> None:
    async with serving(answer(reply, OK)) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url))
        await response.aclose()
        await server.peers[0].closed.wait()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)
        assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 2


@pytest.mark.parametrize("pause", [None, 0.02], ids=["same-packet", "while-idle"])
async def test_bytes_after_a_response_prevent_reuse(pause: float | None) -> None:
    async def answer_then_babble(peer: Peer) -> None:
        await peer.request()
        if pause is None:
            await peer.send(OK + OK)
        else:
            await peer.send(OK)
            await asyncio.sleep(pause)
            await peer.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await peer.client_closed()

    async with serving(answer_then_babble) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"ok")
        await server.peers[0].closed.wait()  # the client closed it
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


async def test_close_delimited_body_ends_with_the_connection() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1,")
        await asyncio.sleep(0.01)
        await peer.send(b"part2")

    async with serving(handle) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"part1,part2")
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


@pytest.mark.parametrize(
    "reply",
    [
        CHUNKED_HEAD + b"5\r\nhello\r\n",  # no last chunk
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",  # 5 bytes short
    ],
    ids=["chunked", "content-length"],
)
async def test_server_dropping_mid_body_is_a_protocol_error(reply: bytes) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)

    async with serving(handle) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url))
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


@pytest.mark.parametrize(
    ("reply", "message"),
    [(b"", "without sending a response"), (b"SMTP ready\r\n\r\n", "Invalid HTTP response")],
    ids=["closed", "not-http"],
)
async def test_no_valid_head_is_a_protocol_error(reply: bytes, message: str) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)

    async with serving(handle) as server, Http1Transport() as transport:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await transport.handle_async_request(request("GET", server.url))
        assert transport.connections_in_use == 0


async def test_refused_port_is_a_connect_error() -> None:
    async with Http1Transport() as transport:
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, f"http://127.0.0.1:{free_port()}/")


async def test_connect_timeout_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real_connect = loop.create_connection

    async def never_connects(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    async with serving(keep_answering(OK)) as server, Http1Transport(max_connections=1) as t:
        monkeypatch.setattr(loop, "create_connection", never_connects)
        with pytest.raises(httpx.ConnectTimeout):
            await fetch(t, server.url, timeouts={"connect": 0.05, "pool": 0.05})
        monkeypatch.setattr(loop, "create_connection", real_connect)
        # The one slot is free again: no PoolTimeout.
        assert await fetch(t, server.url, timeouts={"connect": 5, "pool": 0.05}) == (200, b"ok")


async def test_stale_idle_connection_is_replaced() -> None:
    async def answer_once_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)  # keep-alive as far as the client knows

    async with serving(answer_once_then_close) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"ok")
        await server.peers[0].closed.wait()
        while transport.connections_idle:  # the loop notices the close on its own
            await asyncio.sleep(0.001)
        assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 2


async def test_idle_connections_are_closed_after_the_keepalive_expiry() -> None:
    async with (
        serving(keep_answering(OK)) as server,
        Http1Transport(keepalive_expiry=0.2) as transport,
    ):
        assert await fetch(transport, server.url) == (200, b"ok")
        await asyncio.sleep(0.1)
        assert await fetch(transport, server.url) == (200, b"ok")  # reused within the expiry
        assert server.connections == 1
        assert transport.connections_idle == 1
        await asyncio.wait_for(server.peers[0].closed.wait(), 2.0)  # closed by the client
        assert transport.connections_idle == 0
        assert await fetch(transport, server.url) == (200, b"ok")
        assert server.connections == 2


async def test_max_connections_queues_until_the_body_is_read() -> None:
    finish = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfi")
        await finish.wait()
        await peer.send(b"rs")
        while await peer.request():
            await peer.send(OK)

    async with serving(handle) as server, Http1Transport(max_connections=1) as transport:
        first = await transport.handle_async_request(request("GET", server.url))
        second = asyncio.create_task(fetch(transport, server.url))
        await asyncio.sleep(0.05)
        assert not second.done()
        assert server.connections == 1
        finish.set()
        assert await first.aread() == b"firs"
        assert await second == (200, b"ok")
        assert server.connections == 1  # handed straight over


async def test_pool_timeout_when_all_connections_are_busy() -> None:
    async with serving(keep_answering(OK)) as server, Http1Transport(max_connections=1) as t:
        held = await t.handle_async_request(request("GET", server.url))
        with pytest.raises(httpx.PoolTimeout):
            await fetch(t, server.url, timeouts={"connect": 5, "pool": 0.05})
        assert await held.aread() == b"ok"
        assert await fetch(t, server.url) == (200, b"ok")  # the timed-out waiter left no trace
        assert server.connections == 1


async def test_cancel_while_waiting_for_the_head_closes_the_connection() -> None:
    async def never_answer(peer: Peer) -> None:
        await peer.request()
        await peer.client_closed()

    async with serving(never_answer) as server, Http1Transport(max_connections=1) as t:
        task = asyncio.create_task(fetch(t, server.url))
        await server.received.wait()
        assert t.connections_in_use == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (t.connections_in_use, t.connections_idle) == (0, 0)
        await server.peers[0].closed.wait()  # the server saw the connection closed


async def test_cancel_while_reading_the_body_closes_the_connection() -> None:
    async def stall_mid_body(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"2\r\nhi\r\n")
        await peer.client_closed()

    async with serving(stall_mid_body) as server, Http1Transport(max_connections=1) as t:
        response = await t.handle_async_request(request("GET", server.url))
        task = asyncio.create_task(response.aread())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await response.aclose()
        assert (t.connections_in_use, t.connections_idle) == (0, 0)
        await server.peers[0].closed.wait()


async def test_reading_pauses_while_the_body_is_not_consumed() -> None:
    size = 8 * 1024 * 1024

    async def big(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        await peer.client_closed()

    async with serving(big) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url))
        conn = response.stream._conn  # type: ignore[union-attr]
        while not conn.paused:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the server keeps writing; nothing more is read
        assert conn.buffered < 1024 * 1024  # 64 KiB plus at most one socket read
        assert len(await response.aread()) == size


async def test_aclose_closes_idle_and_in_use_connections() -> None:
    async with serving(keep_answering(OK)) as server:
        transport = Http1Transport()
        assert await fetch(transport, server.url) == (200, b"ok")
        held = await transport.handle_async_request(request("GET", server.url))
        await transport.aclose()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)
        await asyncio.gather(*(peer.closed.wait() for peer in server.peers))
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, server.url)
        await held.aclose()


async def test_unsupported_requests_fail_before_connecting() -> None:
    async with Http1Transport() as transport:
        with pytest.raises(httpx.UnsupportedProtocol):
            await fetch(transport, "ftp://127.0.0.1/")
        with pytest.raises(httpx.UnsupportedProtocol, match="HEAD"):
            await transport.handle_async_request(request("HEAD", "http://127.0.0.1:9/"))
        smuggled = [(b"x-a", b"1\r\nx-b: 2")]
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(transport, "http://127.0.0.1:9/", headers=smuggled)


async def test_tls_with_a_trusted_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with serving(keep_answering(OK), tls=server_context) as server:
        async with Http1Transport(ssl_context=trusting) as transport:
            assert await fetch(transport, server.url) == (200, b"ok")
            assert await fetch(transport, server.url) == (200, b"ok")
            assert server.connections == 1
            assert server.requests[0].startswith(b"POST / HTTP/1.1\r\n")
        async with Http1Transport() as untrusting:  # the system store does not know it
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(untrusting, server.url)


async def test_works_under_httpx_async_client() -> None:
    async def echo(peer: Peer) -> None:
        while data := await peer.request():
            head, _, body = data.partition(b"\r\n\r\n")
            payload = head.split(b" ", 1)[0] + b" " + body
            reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            await peer.send(reply % len(payload) + payload)

    async with (
        serving(echo) as server,
        httpx.AsyncClient(transport=Http1Transport(), base_url=server.url) as client,
    ):
        got = await client.get("/models", params={"limit": 2})
        assert (got.status_code, got.text) == (200, "GET ")
        assert server.requests[0].startswith(b"GET /models?limit=2 HTTP/1.1\r\n")
        posted = await client.post("/v1/chat/completions", json={"model": "m"})
        assert (posted.status_code, posted.text) == (200, 'POST {"model":"m"}')
        async with client.stream("POST", "/stream", content=b"abc") as streamed:
            assert [chunk async for chunk in streamed.aiter_bytes()] == [b"POST abc"]
        assert server.connections == 1


async def test_limits_evict_idle_of_another_origin_and_cap_idle() -> None:
    async with (
        serving(keep_answering(OK)) as one,
        serving(keep_answering(OK)) as other,
        Http1Transport(max_connections=1) as transport,
    ):
        assert await fetch(transport, one.url) == (200, b"ok")
        tight = {"connect": 5.0, "pool": 0.05}
        assert await fetch(transport, other.url, timeouts=tight) == (200, b"ok")
        await one.peers[0].closed.wait()  # closed to make room
        assert transport.connections_idle == 1
    async with (
        serving(keep_answering(OK)) as server,
        Http1Transport(max_keepalive_connections=1) as transport,
    ):
        held = [await transport.handle_async_request(request("GET", server.url)) for _ in "ab"]
        assert server.connections == 2
        for response in held:
            await response.aread()
        assert transport.connections_idle == 1
        await server.peers[1].closed.wait()  # the second one back found the idle list full


async def flood(peer: Peer, prefix: bytes, size: int, suffix: bytes) -> None:
    """`prefix`, then `size` bytes of b"a" in 1 MiB writes, then `suffix`."""
    await peer.send(prefix)
    piece = b"a" * (1024 * 1024)
    for _ in range(size // len(piece)):
        await peer.send(piece)
    await peer.send(suffix)
    await peer.client_closed()


@pytest.mark.parametrize("part", ["head", "trailers"])
async def test_a_flood_of_header_bytes_is_refused_without_buffering_it(part: str) -> None:
    size = 32 * 1024 * 1024

    async def handle(peer: Peer) -> None:
        await peer.request()
        if part == "head":
            await flood(peer, b"HTTP/1.1 200 OK\r\nX-Flood: ", size, b"\r\n\r\n")
        else:
            await flood(peer, CHUNKED_HEAD + b"2\r\nhi\r\n0\r\nX-Flood: ", size, b"\r\n\r\n")

    async with serving(handle) as server, Http1Transport() as transport:
        tracemalloc.start()
        try:
            with pytest.raises(httpx.RemoteProtocolError, match=f"{part} exceeds 102400 bytes"):
                await fetch(transport, server.url)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * 1024 * 1024  # a few socket reads, never the 32 MiB sent
        await server.peers[0].closed.wait()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


async def test_head_up_to_100_kib_is_read_and_one_byte_more_is_refused() -> None:
    def reply(head_size: int) -> bytes:
        start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
        return start + b"p" * (head_size - len(start) - 4) + b"\r\n\r\nok"

    exact, over = reply(100 * 1024), reply(100 * 1024 + 1)
    async with serving(answer(exact, over)) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"ok")
        with pytest.raises(httpx.RemoteProtocolError, match="head exceeds"):
            await fetch(transport, server.url)
        await server.peers[0].closed.wait()


async def test_more_than_1000_headers_are_refused() -> None:
    def reply(count: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * (count - 1) + b"Content-Length: 2\r\n\r\nok"

    async with serving(answer(reply(1000), reply(1001))) as server, Http1Transport() as t:
        assert await fetch(t, server.url) == (200, b"ok")
        with pytest.raises(httpx.RemoteProtocolError, match="more than 1000 headers"):
            await fetch(t, server.url)
        await server.peers[0].closed.wait()


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (b"000", "status code 0 "),
        (b"099", "status code 99 "),
        (b"600", "status code 600 "),
        (b"999", "status code 999 "),
        (b"101", "switched protocols"),
    ],
)
async def test_status_outside_100_to_599_or_101_is_refused(status: bytes, message: str) -> None:
    # After it, a valid response that must not be taken for this request's answer.
    reply = b"HTTP/1.1 " + status + b" X\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc" + OK
    async with serving(answer(reply)) as server, Http1Transport() as transport:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await fetch(transport, server.url)
        await server.peers[0].closed.wait()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


async def test_idle_connection_closed_by_the_server_unseen_by_the_loop_is_not_used() -> None:
    # The body is larger than the read buffer's high-water mark, so reading pauses with the
    # server's FIN unread; the next request picks the connection before the loop sees the close.
    size = 100 * 1024

    async def answer_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)

    async with serving(answer_then_close) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url))
        await server.peers[0].closed.wait()
        assert len(await response.aread()) == size
        assert transport.connections_idle == 1
        status, body = await fetch(transport, server.url)
        assert (status, len(body)) == (200, size)
        assert server.connections == 2
        assert [data.split(b" ", 1)[0] for data in server.requests] == [b"GET", b"POST"]


@pytest.mark.parametrize(
    "framing",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXY0\r\n\r\n", b"1" * 20 + b"\r\n"],
    ids=["not-hex", "no-crlf-after-data", "size-overflow"],
)
async def test_broken_chunked_framing_is_a_protocol_error(framing: bytes) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + framing)
        await peer.client_closed()

    async with serving(handle) as server, Http1Transport() as transport:
        response = await transport.handle_async_request(request("GET", server.url))
        with pytest.raises(httpx.RemoteProtocolError, match="Invalid HTTP response"):
            await response.aread()
        await server.peers[0].closed.wait()
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)


async def test_http_1_0_responses_end_with_the_connection_unless_kept_alive() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        if peer is peer.server.peers[0]:
            await peer.send(
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
            )
            await peer.request()
            await peer.send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await peer.client_closed()
        else:
            await peer.send(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    async with serving(handle) as server, Http1Transport() as transport:
        assert await fetch(transport, server.url) == (200, b"ok")  # kept alive: reused
        assert await fetch(transport, server.url) == (200, b"ok")  # 1.0 default: closed after
        await server.peers[0].closed.wait()
        assert await fetch(transport, server.url) == (200, b"until the end")
        assert server.connections == 2
        assert (transport.connections_in_use, transport.connections_idle) == (0, 0)
