"""One shared Redis connection for the hot path's two script calls (admit and settle).

redis-py checks a connection out of its pool for every command, checks it for stray data, and
arms a timer around each send and each read: 51 µs of CPU per EVALSHA under 32 concurrent
requests, measured here. Redis answers a connection's commands in order, so concurrent requests
can share one connection instead: each call writes its command and queues a future, and each
reply resolves the oldest future (6 µs per call, and Redis reads many commands per wake-up).
One watchdog timer per connection replaces the per-call timeouts: when the oldest call has
waited longer than the timeout the connection is dropped and every waiting call fails.

On Redis Cluster there is one such connection per master, routed by redis-py's slot map.
Everything else (admin, usage queries, the sweeper, spool replay) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any

import hiredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url

_PENDING = tuple[asyncio.Future[Any], float]  # (the caller's future, loop time it was sent)


class _Wire(asyncio.Protocol):
    """The protocol side of one connection: replies resolve pending calls in order."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(encoding="utf-8", replyError=redis.exceptions.ResponseError)
        self.pending: deque[_PENDING] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent: list[bytes] = []  # commands of this event-loop turn, sent together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        try:
            while (reply := self.reader.gets()) is not False:
                future = pending.popleft()[0]
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(redis.exceptions.ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError("Connection to Redis lost"))

    def call(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(redis.exceptions.ConnectionError("Connection to Redis lost"))
            return future
        if not self._unsent:
            loop.call_soon(self._flush)
        self._unsent.append(hiredis.pack_command(args))
        if not self.pending and self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s, self._check)
        self.pending.append((future, loop.time()))
        return future

    def _flush(self) -> None:
        """One write for every command issued in this turn of the event loop: fewer system
        calls here, and Redis reads them all in one wake-up."""
        unsent, self._unsent = self._unsent, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(unsent))

    def _check(self) -> None:
        """Fail everything when the oldest call is overdue; otherwise look again when it
        would be."""
        self._watchdog = None
        if not self.pending:
            return
        loop = asyncio.get_running_loop()
        overdue_at = self.pending[0][1] + self.timeout_s
        if loop.time() >= overdue_at:
            self.fail(redis.exceptions.TimeoutError("Timeout reading from Redis"))
        else:
            self._watchdog = loop.call_at(overdue_at, self._check)

    def fail(self, error: Exception) -> None:
        """Close the connection; every call still waiting gets `error`."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(error)


class RedisMux:
    """A lazily (re)connected shared connection to one Redis server."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        address: tuple[str, int] | None = None,
    ) -> None:
        """`address` overrides the URL's host and port (a cluster node; the URL's credentials
        still apply)."""
        options = parse_url(url)
        self.host: str = address[0] if address else options.get("host", "localhost")
        self.port: int = address[1] if address else options.get("port", 6379)
        self.path: str | None = options.get("path")
        self.username: str | None = options.get("username")
        self.password: str | None = options.get("password")
        self.db: int = int(options.get("db") or 0)
        self.tls = _tls_context(options) if url.startswith("rediss://") else None
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._wire: _Wire | None = None
        self._connecting: asyncio.Future[_Wire] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        """TCP, Unix sockets, and TLS with the common URL options; rarer TLS options (CA data,
        ciphers, minimum version) leave the URL to redis-py."""
        if url.startswith(("redis://", "unix://")):
            return True
        options = parse_url(url) if url.startswith("rediss://") else {}
        return bool(options) and {k for k in options if k.startswith("ssl_")} <= _TLS_OPTIONS

    async def execute(self, *args: Any) -> Any:
        """One command; an error reply is raised as redis-py's ResponseError."""
        wire = self._wire
        if wire is None or wire.closed:
            wire = await self._connection()
        reply = await wire.call(args)
        if isinstance(reply, redis.exceptions.ResponseError):
            error = _response_error(reply)
            if isinstance(error, redis.exceptions.ConnectionError):
                wire.fail(error)  # the next call connects afresh
            raise error
        return reply

    async def evalsha(self, sha: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script once when Redis does not know it (NOSCRIPT)."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.execute("SCRIPT", "LOAD", script)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def _connection(self) -> _Wire:
        """The live connection, or a new one; concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        wire: _Wire | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, wire = await loop.create_unix_connection(
                        lambda: _Wire(self.timeout_s), self.path
                    )
                else:
                    _, wire = await loop.create_connection(
                        lambda: _Wire(self.timeout_s),
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=self.host if self.tls is not None else None,
                    )
                await self._handshake(wire)
        except BaseException as exc:
            if wire is not None:  # connected, but not usable: do not leave the socket open
                wire.fail(redis.exceptions.ConnectionError("Connection to Redis abandoned"))
            if isinstance(exc, TimeoutError):
                raise redis.exceptions.TimeoutError("Timeout connecting to Redis") from None
            if isinstance(exc, OSError):
                raise redis.exceptions.ConnectionError(f"Error connecting to Redis: {exc}") from exc
            raise
        self._wire = wire
        return wire

    async def _handshake(self, wire: _Wire) -> None:
        """AUTH and SELECT from the URL, sent together; a refusal is a connection failure."""
        handshake = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            handshake.append(wire.call(("AUTH", *auth)))
        if self.db:
            handshake.append(wire.call(("SELECT", self.db)))
        for reply in await asyncio.gather(*handshake):
            if isinstance(reply, redis.exceptions.ResponseError):
                raise redis.exceptions.AuthenticationError(str(reply))

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._wire is not None:
            self._wire.fail(redis.exceptions.ConnectionError("Connection to Redis closed"))
            self._wire = None


# The rediss:// URL options handled here, as redis-py's SSLConnection reads them.
_TLS_OPTIONS = frozenset(
    {"ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname", "ssl_certfile", "ssl_keyfile"}
)
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The context redis-py would build from the same URL: the system's trust store unless
    `ssl_ca_certs` names one, certificates and host names checked unless turned off."""
    context = ssl.create_default_context()
    reqs = _CERT_REQS[str(options.get("ssl_cert_reqs", "required")).lower()]
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and (
        reqs != ssl.CERT_NONE
    )
    context.verify_mode = reqs
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    if options.get("ssl_ca_certs"):
        context.load_verify_locations(cafile=options["ssl_ca_certs"])
    return context


# Cluster replies meaning "not here, not now": the script did not run.
_REDIRECTS = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})


class ClusterMux:
    """Script calls on Redis Cluster: each goes over the shared connection of the master that
    owns its slot (every key of one call shares a hash tag, so one slot).

    redis-py's cluster client keeps the slot map. A redirect reply sends that one call through
    redis-py, which follows it and refreshes the map; after a lost connection the map is
    reloaded before the next call, so a failover is picked up.
    """

    def __init__(
        self, client: RedisCluster, url: str, *, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.client = client
        self.url = url
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._nodes: dict[str, RedisMux] = {}
        self._stale = False

    async def evalsha(self, sha: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        client = self.client
        await client.initialize()  # once; later calls return at once
        if self._stale:
            self._stale = False
            await client.nodes_manager.initialize()
        node = client.get_node_from_key(keys[0])
        if node is None:
            self._stale = True
            raise redis.exceptions.ConnectionError("No cluster node serves this slot")
        mux = self._nodes.get(node.name)
        if mux is None:
            mux = self._nodes[node.name] = RedisMux(
                self.url,
                timeout_s=self.timeout_s,
                connect_timeout_s=self.connect_timeout_s,
                address=(str(node.host), int(node.port)),
            )
        try:
            return await mux.evalsha(sha, script, keys, args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._stale = True
            raise
        except redis.exceptions.ResponseError as exc:
            if _error_code(exc) not in _REDIRECTS:
                raise
            reply: Any = client.evalsha(sha, len(keys), *keys, *args)
            return await reply

    async def aclose(self) -> None:
        for mux in self._nodes.values():
            await mux.aclose()


def _response_error(reply: redis.exceptions.ResponseError) -> redis.exceptions.RedisError:
    """The exception classes redis-py raises for an error reply; a server that refuses us
    (not authenticated, loading, a read-only replica after a failover) is a store failure."""
    message = str(reply)
    code = _error_code(reply)
    if code == "NOSCRIPT":
        return redis.exceptions.NoScriptError(message)
    if code == "LOADING":
        return redis.exceptions.BusyLoadingError(message)
    if code in ("NOAUTH", "WRONGPASS", "READONLY", "MASTERDOWN"):
        return redis.exceptions.ConnectionError(message)
    return reply


def _error_code(reply: redis.exceptions.ResponseError) -> str:
    """The first word of an error reply: MOVED, NOSCRIPT, WRONGPASS, ..."""
    return str(reply).split(" ", 1)[0]
