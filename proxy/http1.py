"""A lean HTTP/1.1 client transport for httpx, on asyncio Protocols and httptools.

Why: the upstream hop is the proxy's hot path. httpx's request/response types are kept (the
rest of the proxy speaks them), but the bytes are moved by an asyncio Protocol that feeds
`httptools.HttpResponseParser` directly: about 70 µs of CPU per request against nginx on
loopback, half of the aiohttp transport's 140 µs.

What it does: HTTP/1.1 over TCP or TLS, one keep-alive pool per origin (idle connections
reused last-in first-out), at most `max_connections` open per transport with FIFO queueing
for the rest, and the response returned as soon as its head is parsed with the body streamed
as it arrives (read pauses while more than 64 KiB is buffered unread).

What it refuses, as httpcore does (`httpx.RemoteProtocolError`, connection closed): a response
head (status line and headers, interim 1xx heads included) over 100 KiB or with more than 1,000
headers, trailers over 100 KiB, a status outside 100-599, and a 101 Switching Protocols (no
request here asks to upgrade). The parser is never given more than 100 KiB in a row from which
no head, body or end comes out, so a flood of header bytes is refused, not buffered.

What it leaves out, on purpose:
- Read and write timeouts: callers bound the whole exchange and cancel the task; any
  cancellation closes the connection in use and frees its slot. Only connecting (and
  waiting for a pool slot) is bounded here, by the request's "timeout" extension.
- HEAD and CONNECT: httptools cannot be told that a response has no body, so they are
  refused (`httpx.UnsupportedProtocol`) rather than hanging on a body that never comes.
- HTTP/2, proxies, pipelining, request bodies streamed as they are produced (a streamed
  request body is read whole before it is sent).
- Retrying: a keep-alive connection that the server has closed is never written to: one the
  loop has seen closing is already dropped, and before reuse its socket is polled, as httpcore
  does, for a close the loop has not seen yet (then another connection is used; nothing was
  sent). One the server closes after the request is written fails that request (as in
  httpcore); a retry might repeat a non-idempotent request.

Trust (https): `ssl_context` if given; else certifi's store, or the file or directory named by
SSL_CERT_FILE / SSL_CERT_DIR (as httpx's default transport reads them), plus `ca_file`.
"""

from __future__ import annotations

import asyncio
import os
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import cast

import certifi
import httptools
import httpx

__all__ = ["Http1Transport"]

Origin = tuple[str, str, int]  # scheme, host (IDNA, no brackets), port

_HIGH_WATER = 64 * 1024  # unread body bytes buffered before the socket stops being read
_MAX_HEAD_BYTES = 100 * 1024  # a response head or its trailers (httpcore's limit, via h11)
_MAX_HEADERS = 1000
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_BODY_METHODS = frozenset({"HEAD", "CONNECT"})
_DISCONNECTED = "Server disconnected without sending a response"


class _ExtraData(Exception):
    """Raised from a parser callback to stop at bytes that follow a complete response."""


class _Refused(Exception):
    """Raised from a parser callback to stop at a response refused (`error` says why)."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses what arrives and wakes the one reader waiting on it.

    A connection holds one of its transport's `max_connections` slots while `counted`;
    `Http1Transport._discard` gives the slot back exactly once.
    """

    __slots__ = (
        "_loop",
        "_waiter",
        "buffered",
        "chunks",
        "complete",
        "counted",
        "error",
        "expecting",
        "head",
        "headers",
        "idle",
        "idle_since",
        "keep_alive",
        "lost",
        "origin",
        "owner",
        "parser",
        "paused",
        "pending",
        "poll",
        "status",
        "transport",
    )

    def __init__(
        self, owner: Http1Transport, origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.owner = owner
        self.origin = origin
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.counted = False  # set once the connection is established and owns its slot
        self.idle = False  # in its origin's idle list
        self.idle_since = 0.0  # loop time it became idle
        self.expecting = False  # a request was written and its response is not yet consumed
        self.lost = False  # connection_lost was called: never usable again
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = False
        self.complete = False
        self.keep_alive = False
        self.error: httpx.TransportError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.pending = 0  # bytes fed since the parser last got to a head, body or end
        self.poll: select.poll | None = None  # this socket alone, to see a close unseen yet
        self._waiter: asyncio.Future[None] | None = None

    # -- the exchange, driven by the transport and the response stream --

    def start(self, payload: bytes) -> None:
        """Reset the per-response state and send one request (head and body in one write)."""
        assert self.transport is not None
        self.status = 0
        self.headers = []
        self.head = self.complete = self.keep_alive = False
        self.error = None
        self.expecting = True
        self.pending = 0
        self.transport.write(payload)

    async def wait(self) -> None:
        """Until the parser or the socket has news (one future, no task, no timer)."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Everything buffered, as one piece; reading resumes once the buffer is drained."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()
        return data

    def close(self, *, abort: bool = False) -> None:
        """Close for good (idempotent). `abort` drops unsent and unread bytes at once, for a
        connection given up mid-exchange; a reader still waiting on it gets an error."""
        self.keep_alive = False
        if self.expecting and not self.complete and self.error is None:
            self.error = httpx.ReadError("The connection was closed before the response ended")
        self._wake()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self.owner._discard(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def closed_by_peer(self) -> bool:
        """Idle, yet readable: the server closed it (or wrote unasked) and the loop has not
        seen it yet; httpcore makes the same check before reuse. One poll(2), about 0.6 µs."""
        return self.lost or (self.poll is not None and bool(self.poll.poll(0)))

    def _close_delimited(self) -> bool:
        """No Content-Length and not chunked: the body ends with the connection (RFC 9112
        6.3). Only asked when the connection ends mid-body, so the hot path never scans."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                return False
            if lowered == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
                return False
        return True

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance-checked: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            self.poll = select.poll()
            self.poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.expecting:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        # httptools keeps a header's pieces until the header ends, so the bytes it is given
        # while no head, body or end comes out of them (a head, trailers) are capped.
        pending = self.pending + len(data)
        if pending > _MAX_HEAD_BYTES:
            self._feed_capped(data)
            return
        self.pending = pending
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._invalid(exc)

    def _invalid(self, exc: Exception) -> None:
        if not self.complete and self.error is None:
            self.error = httpx.RemoteProtocolError(f"Invalid HTTP response: {exc!r}")
        self.close()  # after a complete response: extra bytes, never reused

    def _feed_capped(self, data: bytes) -> None:
        """Only what fits under the cap is fed; if the parser gets past the head (or on to
        body or the end) within it, the rest follows, else the response is refused."""
        fits = _MAX_HEAD_BYTES - self.pending
        self.pending = _MAX_HEAD_BYTES
        try:
            self.parser.feed_data(data[:fits])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._invalid(exc)
        assert self.transport is not None
        if self.transport.is_closing():  # the parser refused the bytes
            return
        if self.pending < _MAX_HEAD_BYTES:
            self.data_received(data[fits:])
            return
        if self.error is None:
            part = "trailers" if self.head else "head"
            self.error = httpx.RemoteProtocolError(
                f"The response {part} exceeds {_MAX_HEAD_BYTES} bytes"
            )
        self.close(abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.keep_alive = False
        if self.expecting and not self.complete and self.error is None:
            if exc is not None:
                kind = httpx.WriteError if isinstance(exc, BrokenPipeError) else httpx.ReadError
                self.error = kind(f"Connection lost: {exc!r}")
            elif not self.head:
                self.error = httpx.RemoteProtocolError(_DISCONNECTED)
            elif self._close_delimited():
                self.complete = True  # httptools has no EOF call: the end is ours to see
            else:
                self.error = httpx.RemoteProtocolError(
                    "Server disconnected before the response body ended"
                )
        self._wake()
        self.owner._discard(self)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self.complete:
            raise _ExtraData

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or status > 599:
            if 100 <= status < 200 and status != 101:
                self.headers = []  # interim: httptools ends it as a message of its own
                return
            self.error = httpx.RemoteProtocolError(
                "The server switched protocols (101) unasked"
                if status == 101
                else f"Invalid HTTP status code {status} (not 100-599)"
            )
            raise _Refused
        if len(self.headers) > _MAX_HEADERS:
            self.error = httpx.RemoteProtocolError(
                f"The response has more than {_MAX_HEADERS} headers"
            )
            raise _Refused
        self.status = status
        self.head = True
        self.pending = 0
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.pending = 0
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head:  # not the end of an interim 1xx response
            self.pending = 0
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
            self._wake()


class _ResponseStream(httpx.AsyncByteStream):
    """The body as it arrives. A clean end returns the connection to the pool; an early
    close, an error or a cancellation closes it."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                elif conn.complete:
                    break
                elif conn.error is not None:
                    raise conn.error
                else:
                    await conn.wait()
        except BaseException:  # errors, cancellation, and the generator closed mid-body
            if self._conn is conn:
                self._conn = None
                conn.close(abort=True)
            raise
        if self._conn is conn:
            self._conn = None
            conn.owner._release(conn)

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.complete and not conn.chunks:  # nothing left unread: still reusable
            conn.owner._release(conn)
        else:
            conn.close(abort=True)


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport: see the module docstring for what it does and does not.

    `max_connections` bounds the connections open at once (in use, idle or connecting);
    further requests queue in order for up to the request's pool timeout. At most
    `max_keepalive_connections` idle connections are kept, each for `keepalive_expiry` seconds
    (httpx's default of 5 s: well under the idle timeouts servers use, so a connection is
    rarely reused just as the server closes it, and an idle proxy holds no sockets).

    https origins use `ssl_context` if given. Otherwise the trust store is httpx's: certifi's,
    or with `trust_env` the file SSL_CERT_FILE or else the directory SSL_CERT_DIR names
    instead; `ca_file` (PEM) adds CAs on top. A trust store other than certifi's is loaded
    here, so a file that cannot be read fails at startup rather than on the first request.
    """

    def __init__(
        self,
        *,
        max_connections: int = 1024,
        max_keepalive_connections: int = 256,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | Path | None = None,
        trust_env: bool = True,
    ) -> None:
        if max_connections < 1 or max_keepalive_connections < 0 or keepalive_expiry <= 0:
            raise ValueError(
                "max_connections must be >= 1, max_keepalive_connections >= 0, keepalive_expiry > 0"
            )
        if ssl_context is not None and ca_file is not None:
            raise ValueError("ca_file goes into the default context: pass ssl_context or ca_file")
        if ssl_context is None:
            cafile, capath = _trust_store_from_environment() if trust_env else (None, None)
            if cafile or capath or ca_file is not None:
                ssl_context = _client_ssl_context(cafile=cafile, capath=capath, extra=ca_file)
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._active: set[_Connection] = set()
        self._open = 0  # slots held: connections open, idle or being opened
        self._waiters: deque[tuple[Origin, asyncio.Future[_Connection | None]]] = deque()
        self._closing = False

    @property
    def connections_in_use(self) -> int:
        """Connections checked out for a request whose response is not yet consumed."""
        return len(self._active)

    @property
    def connections_idle(self) -> int:
        """Connections kept open for reuse."""
        return self._idle_count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closing:
            raise httpx.ConnectError("The transport is closed")
        url = request.url
        scheme = url.scheme
        default_port = _DEFAULT_PORTS.get(scheme)
        if default_port is None:
            raise httpx.UnsupportedProtocol(f"Only http and https URLs are supported: {url}")
        if request.method in _NO_BODY_METHODS:
            raise httpx.UnsupportedProtocol(f"{request.method} requests are not supported")
        host = url.raw_host.decode("ascii")
        if not host:
            raise httpx.UnsupportedProtocol(f"The request URL has no host: {url}")
        origin = (scheme, host, url.port or default_port)
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await _read_streamed(request)
        payload = _serialize(request, body)
        timeouts = request.extensions.get("timeout") or {}

        conn = await self._acquire(origin, timeouts.get("pool"))
        if conn is None:
            conn = await self._connect(origin, timeouts.get("connect"))
        self._active.add(conn)
        try:
            if self._closing:
                raise httpx.ConnectError("The transport is closed")
            if conn.lost:  # a fresh connection the server closed straight away
                raise httpx.RemoteProtocolError(_DISCONNECTED)
            conn.start(payload)
            while not conn.head:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.close(abort=True)
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_ResponseStream(conn),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": b""},
            request=request,
        )

    async def aclose(self) -> None:
        """Close every connection, idle or in use; requests from now on fail."""
        self._closing = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        waiters, self._waiters = self._waiters, deque()
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("The transport is closed"))
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        for conn in list(self._active):
            conn.close(abort=True)

    # -- the pool --

    async def _acquire(self, origin: Origin, timeout: float | None) -> _Connection | None:
        """An open connection to `origin`, or None when the caller now holds a slot to open
        one."""
        while True:
            idle = self._idle.get(origin)
            if idle:  # none the loop saw closing: connection_lost takes it off the list
                conn = idle.pop()
                conn.idle = False
                self._idle_count -= 1
                if not conn.closed_by_peer():
                    return conn
                conn.close()  # nothing was sent on it: take another
                continue
            if self._open < self._max_connections:
                self._open += 1
                return None
            if self._evict_idle():
                return None
            granted = await self._wait(origin, timeout)
            if granted is None or not granted.closed_by_peer():
                return granted
            granted.close()  # closed by the server while being handed over: queue again

    def _evict_idle(self) -> bool:
        """At the limit, close the oldest idle connection of another origin for its slot."""
        for idle in self._idle.values():
            if idle:
                conn = idle.pop(0)
                conn.idle = False
                self._idle_count -= 1
                conn.counted = False  # the slot passes to the caller
                conn.close()
                return True
        return False

    async def _wait(self, origin: Origin, timeout: float | None) -> _Connection | None:
        """Queue (FIFO) for a connection to `origin` or a free slot, up to `timeout`."""
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        entry = (origin, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._pass_on(waiter.result())  # granted just as we gave up: not ours to keep
            else:
                with suppress(ValueError):  # already taken off by a grant or aclose
                    self._waiters.remove(entry)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("Timed out waiting for a connection") from None
            raise

    def _pass_on(self, granted: _Connection | None) -> None:
        if granted is None:
            self._free_slot()
        else:
            self._checkin(granted)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        """Open a connection; the caller holds a slot for it, freed here if this fails."""
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = self._default_ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin, loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
                raise httpx.ConnectTimeout(f"Timed out connecting to {host}:{port}") from None
            if isinstance(exc, OSError):
                raise httpx.ConnectError(f"Cannot connect to {host}:{port}: {exc}") from exc
            raise
        conn.counted = True
        return conn

    def _default_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # certifi's store, loaded on the first https connection
            self._ssl_context = _client_ssl_context(cafile=None, capath=None, extra=None)
        return self._ssl_context

    def _release(self, conn: _Connection) -> None:
        """A response was consumed to its end: keep its connection if it may be reused."""
        self._active.discard(conn)
        conn.expecting = False
        if conn.keep_alive:
            self._checkin(conn)
        else:
            conn.close()

    def _checkin(self, conn: _Connection) -> None:
        """A reusable connection: to the first waiter, else the idle list (or closed)."""
        if self._closing or conn.lost:
            conn.close()
            return
        while self._waiters:
            origin, waiter = self._waiters.popleft()
            if waiter.done():  # cancelled or timed out, not yet out of the queue
                continue
            if origin == conn.origin:
                waiter.set_result(conn)
            else:  # a waiter for another origin: this connection's slot goes to it
                conn.counted = False
                conn.close()
                waiter.set_result(None)
            return
        if self._idle_count >= self._max_keepalive:
            conn.close()
            return
        self._idle.setdefault(conn.origin, []).append(conn)
        conn.idle = True
        conn.idle_since = conn._loop.time()
        self._idle_count += 1
        if self._expiry_timer is None:
            self._expiry_timer = conn._loop.call_later(self._keepalive_expiry, self._expire_idle)

    def _expire_idle(self) -> None:
        """Close the connections idle for longer than the expiry; look again when the
        oldest one left would expire (one timer per transport, none per request)."""
        self._expiry_timer = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._keepalive_expiry
        next_due: float | None = None
        for idle in list(self._idle.values()):
            for conn in list(idle):
                if conn.idle_since <= cutoff:
                    conn.close()
                elif next_due is None or conn.idle_since < next_due:
                    next_due = conn.idle_since
        if next_due is not None:
            self._expiry_timer = loop.call_at(next_due + self._keepalive_expiry, self._expire_idle)

    def _discard(self, conn: _Connection) -> None:
        """A connection is gone: out of every list, its slot freed (once)."""
        self._active.discard(conn)
        if conn.idle:
            conn.idle = False
            self._idle[conn.origin].remove(conn)
            self._idle_count -= 1
        if conn.counted:
            conn.counted = False
            self._free_slot()

    def _free_slot(self) -> None:
        """A slot is free: it passes to the first waiter, if any."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1


def _trust_store_from_environment() -> tuple[str | None, str | None]:
    """SSL_CERT_FILE and SSL_CERT_DIR, read as httpx's default transport reads them (httpx
    0.28 `create_ssl_context`: set and non-empty; the file wins over the directory).

    The one read of the environment outside `proxy/cli/`: these are OpenSSL's variables, not
    Tollgate settings, and an operator who sets them expects any httpx client to follow them.
    """
    return os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None


def _client_ssl_context(
    *, cafile: str | None, capath: str | None, extra: str | Path | None
) -> ssl.SSLContext:
    """httpx's verifying context: the named store replaces certifi's (as in httpx), `extra`
    CAs are trusted on top."""
    if cafile:
        context = ssl.create_default_context(cafile=cafile)
    elif capath:
        context = ssl.create_default_context(capath=capath)
    else:  # httpx's default trust store (certifi, an httpx dependency)
        context = ssl.create_default_context(cafile=certifi.where())
    if extra is not None:
        context.load_verify_locations(cafile=extra)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _read_streamed(request: httpx.Request) -> bytes:
    """A streamed request body, read whole and framed as its headers declare (httpx sends a
    body of unknown length chunked)."""
    body = await request.aread()
    if "transfer-encoding" not in request.headers:
        return body
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    """The request as sent: method, raw path with query, the headers exactly as they are
    (httpx already added Host and Content-Length), then the body."""
    raw = request.headers.raw
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # A CR or LF inside a name, value or the path would split the head (request smuggling).
    if head.count(b"\n") != len(raw) + 2 or head.count(b"\r") != len(raw) + 2:
        raise httpx.LocalProtocolError("A header or the path contains CR or LF")
    return head + body if body else head
