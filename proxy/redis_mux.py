"""Shared Redis connections for the hot path's script calls (admit, settle, release).

redis-py checks a connection out of its pool for every command, checks it for stray data, and
arms a timer around each send and each read: 51 µs of CPU per EVALSHA under 32 concurrent
requests, measured here. Redis answers a connection's commands in order, so concurrent requests
can share one connection instead: each call queues a future, and each reply resolves the oldest
call still owed one (6 µs per call, and Redis reads many commands per wake-up).

Every call has its own deadline, `timeout_s` from when it was issued; one watchdog timer per
connection enforces them all. A call past its deadline fails alone: if it was already written,
its reply is still owed and is skipped when it comes. At most MAX_IN_FLIGHT calls are written
ahead of their replies, none while the oldest has gone unanswered for HOLD_AFTER_S, and none
with too little time left to be answered: the rest wait in the client, where a call that times
out was never sent and so never ran. The connection itself is dropped only when Redis has sent
nothing for `silence_s` while calls are owed replies.

On Redis Cluster there is one such connection per master, routed by redis-py's slot map.
Everything else (admin, usage queries, the sweeper, spool replay) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any

import hiredis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

log = logging.getLogger("tollgate.store")

MAX_IN_FLIGHT = 256  # calls written to one connection ahead of their replies
HOLD_AFTER_S = 0.1  # the oldest call unanswered this long: write no more until Redis answers
SEND_MARGIN_S = 0.05  # a call with less time left than this plus twice the age of the oldest
# unanswered call (how far behind Redis is) plus Redis' time for the calls ahead of it is not
# written: it would likely run after its caller had given up
SILENCE_TIMEOUTS = 3  # a connection silent for this many call timeouts is dead
_WATCHDOG_SLACK_S = 0.01  # deadlines this close together are enforced in one wake-up
_SERVICE_CAP_S = 0.002  # a stall is not a slow call: samples of Redis' time per call stop here

Command = tuple[Any, ...]


class _Call:
    """One or more commands written together, and the future their replies resolve."""

    __slots__ = ("command", "count", "deadline", "future", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[Any], command: bytes, count: int, deadline: float):
        self.future = future
        self.command = command
        self.count = count  # replies owed; more than one resolves the future with a list
        self.deadline = deadline
        self.sent_at = 0.0
        self.replies: list[Any] = []


class _Wire(asyncio.Protocol):
    """The protocol side of one connection: replies resolve written calls in order."""

    def __init__(self, *, timeout_s: float, silence_s: float) -> None:
        self.timeout_s = timeout_s
        self.silence_s = silence_s
        self.reader = hiredis.Reader(encoding="utf-8", replyError=redis.exceptions.ResponseError)
        self.queued: deque[_Call] = deque()  # issued, not written yet
        self.unsent: deque[_Call] = deque()  # too late to write: they fail at their deadline
        self.pending: deque[_Call] = deque()  # written, replies owed, in order
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.heard_at = 0.0  # loop time Redis last sent anything
        self.service_s = 0.0  # Redis' time per call lately (a moving average)
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        # Redis' time per call, from replies that came while it had work queued: how long a
        # call written now behind the others would wait.
        busy_since = max(self.heard_at, self.pending[0].sent_at) if self.pending else now
        self.heard_at = now
        self.reader.feed(data)
        pending = self.pending
        answered = len(pending)
        while True:
            try:
                reply = self.reader.gets()
            except UnicodeDecodeError as exc:  # the reader has moved past this one reply
                reply = redis.exceptions.InvalidResponse(f"Undecodable reply from Redis: {exc}")
            except hiredis.ProtocolError as exc:
                self.fail(redis.exceptions.ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                break
            if not pending:  # e.g. "max number of clients reached" on connecting, then closed
                unsolicited = _reply_error(reply) if isinstance(reply, RedisError) else reply
                message = f"Redis sent a reply nobody asked for: {unsolicited}"
                self.fail(redis.exceptions.ConnectionError(message))
                return
            call = pending[0]
            if call.count > 1:
                call.replies.append(reply)
                if len(call.replies) < call.count:
                    continue
                reply = call.replies
            pending.popleft()
            if not call.future.done():  # timed out or cancelled: its reply is skipped
                call.future.set_result(reply)
        answered -= len(pending)
        if answered > 0:
            sample = min((now - busy_since) / answered, _SERVICE_CAP_S)
            self.service_s += (sample - self.service_s) * 0.2
        if self.queued:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError("Connection to Redis lost"))

    def call(self, *commands: Command) -> asyncio.Future[Any]:
        """Queue commands to be written together; the future gets the reply (a list of replies
        for several commands). Error replies are values, not exceptions."""
        future = self.loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(redis.exceptions.ConnectionError("Connection to Redis lost"))
            return future
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        call = _Call(future, packed, len(commands), self.loop.time() + self.timeout_s)
        self.queued.append(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self.loop.call_at(call.deadline, self._check)
        return future

    def _flush(self) -> None:
        """Write what waits, in one write (fewer system calls here, and Redis reads it all in one
        wake-up); a call cancelled or timed out before this point is never sent."""
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            return
        now = self.loop.time()
        queued, pending = self.queued, self.pending
        behind_s = now - pending[0].sent_at if pending else 0.0
        if behind_s > HOLD_AFTER_S:
            return  # Redis is stalled or backlogged; the next reply writes more
        margin_s = max(SEND_MARGIN_S, 2 * behind_s)
        batch = []
        while queued and len(pending) < MAX_IN_FLIGHT:
            call = queued.popleft()
            if call.future.done():
                continue
            if call.deadline - now < margin_s + len(pending) * self.service_s:
                self.unsent.append(call)
                continue
            call.sent_at = now
            pending.append(call)
            batch.append(call.command)
        if batch:
            self.transport.write(b"".join(batch))

    def _check(self) -> None:
        """Fail the calls past their deadline; drop the connection when Redis has been silent
        for `silence_s` while owing replies; then look again at the next deadline."""
        self._watchdog = None
        if self.closed:
            return
        now = self.loop.time()
        next_at = math.inf
        for waiting in (self.unsent, self.queued):
            while waiting and waiting[0].deadline <= now:
                call = waiting.popleft()
                if not call.future.done():
                    call.future.set_exception(
                        redis.exceptions.TimeoutError("Timeout waiting to send to Redis (not sent)")
                    )
            if waiting:
                next_at = min(next_at, waiting[0].deadline)
        for call in self.pending:
            if call.deadline > now:
                next_at = min(next_at, call.deadline)
                break
            if not call.future.done():
                call.future.set_exception(
                    redis.exceptions.TimeoutError("Timeout reading from Redis")
                )
        if self.pending:
            quiet_since = max(self.heard_at, self.pending[0].sent_at)
            if now - quiet_since >= self.silence_s:
                self.fail(
                    redis.exceptions.ConnectionError(
                        f"Redis sent nothing for {self.silence_s:g} s: connection dropped"
                    )
                )
                return
            next_at = min(next_at, quiet_since + self.silence_s)
        if next_at < math.inf:
            self._watchdog = self.loop.call_at(max(next_at, now + _WATCHDOG_SLACK_S), self._check)

    def fail(self, error: Exception) -> None:
        """Close the connection; every call still waiting gets `error`."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None:
            self.transport.abort()
        for calls in (self.pending, self.queued, self.unsent):
            while calls:
                future = calls.popleft().future
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
        silence_s: float | None = None,
        address: tuple[str, int] | None = None,
    ) -> None:
        """`address` overrides the URL's host and port (a cluster node; the URL's credentials
        still apply). `silence_s` defaults to SILENCE_TIMEOUTS call timeouts."""
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
        self.silence_s = silence_s if silence_s is not None else SILENCE_TIMEOUTS * timeout_s
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
        """One command; an error reply is raised as the exception redis-py would raise."""
        wire = self._wire
        if wire is None or wire.closed:
            wire = await self._connection()
        return self._checked(wire, await wire.call(args))

    async def evalsha(
        self, sha: str, script: str, keys: list[str], args: list[Any], *, asking: bool = False
    ) -> Any:
        """EVALSHA, loading the script on this server when it does not know it (NOSCRIPT).
        `asking` sends ASKING first, in the same write: the slot is being imported here."""
        command: Command = ("EVALSHA", sha, len(keys), *keys, *args)
        if not asking:
            try:
                return await self.execute(*command)
            except redis.exceptions.NoScriptError:
                return await self._together(("SCRIPT", "LOAD", script), command)
        try:
            return await self._together(("ASKING",), command)
        except redis.exceptions.NoScriptError:
            return await self._together(("SCRIPT", "LOAD", script), ("ASKING",), command)

    async def _together(self, *commands: Command) -> Any:
        """Commands written in one piece (nothing of another call between them, and none of
        them sent if the caller is cancelled first); returns the last one's reply."""
        wire = self._wire
        if wire is None or wire.closed:
            wire = await self._connection()
        replies = await wire.call(*commands)
        for reply in replies[:-1]:
            self._checked(wire, reply)
        return self._checked(wire, replies[-1])

    @staticmethod
    def _checked(wire: _Wire, reply: Any) -> Any:
        if isinstance(reply, redis.exceptions.RedisError):
            error = _reply_error(reply)
            if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.ReadOnlyError):
                wire.fail(error)  # not authenticated, or now a replica: the next call reconnects
            raise error
        return reply

    async def _connection(self) -> _Wire:
        """The live connection, or a new one; concurrent callers share one attempt, which goes
        on when they are all cancelled and is forgotten once it ends."""
        if self._connecting is None or self._connecting.done():
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(self._connect_ended)
        return await asyncio.shield(self._connecting)

    def _connect_ended(self, connecting: asyncio.Future[_Wire]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # retrieved here: every caller may be gone

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        wire: _Wire | None = None

        def protocol() -> _Wire:
            return _Wire(timeout_s=self.timeout_s, silence_s=self.silence_s)

        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, wire = await loop.create_unix_connection(protocol, self.path)
                else:
                    _, wire = await loop.create_connection(
                        protocol,
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
        handshake: list[Command] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            handshake.append(("AUTH", *auth))
        if self.db:
            handshake.append(("SELECT", self.db))
        if not handshake:
            return
        replies = await wire.call(*handshake)
        for reply in replies if len(handshake) > 1 else [replies]:
            if isinstance(reply, redis.exceptions.RedisError):
                error = _reply_error(reply)
                if isinstance(error, redis.exceptions.ConnectionError):
                    raise error  # e.g. max number of clients reached
                raise redis.exceptions.AuthenticationError(str(reply))

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._wire is not None:
            self._wire.fail(redis.exceptions.ConnectionError("Connection to Redis closed"))
            self._wire = None

    async def aclose(self) -> None:
        self.close()


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


MAX_REDIRECTS = 5  # MOVED / ASK / TRYAGAIN replies followed for one call
TRYAGAIN_PAUSE_S = 0.05
MAP_RELOAD_INTERVAL_S = 0.5  # slot map reloads, at most this often


class ClusterMux:
    """Script calls on Redis Cluster: each goes over the shared connection of the master that
    owns its slot (every key of one call shares a hash tag, so one slot).

    redis-py's cluster client keeps the slot map; it is reloaded in the background, one reload
    at a time, after a failure or a MOVED, so no call waits for a reload of a cluster that does
    not answer. MOVED and ASK are followed here (a node that does not know a script gets it
    loaded); connections to nodes that are no longer masters are dropped after a reload.
    """

    def __init__(
        self, client: RedisCluster, url: str, *, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.client = client
        self.url = url
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._nodes: dict[str, RedisMux] = {}
        self._reload: asyncio.Task[None] | None = None
        self._reloaded_at = -math.inf
        self._reload_error: BaseException | None = None

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        host, port = await self._owner(keys[0])
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                return await self._node(host, port).evalsha(sha, script, keys, args, asking=asking)
            except redis.exceptions.MovedError as exc:  # the slot has a new owner
                self.reload()
                host, port, asking = str(exc.host), int(exc.port), False
            except redis.exceptions.AskError as exc:  # the slot is moving: its keys are there
                host, port, asking = str(exc.host), int(exc.port), True
            except redis.exceptions.TryAgainError:  # the slot's keys are split mid-migration
                await asyncio.sleep(TRYAGAIN_PAUSE_S)
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.ClusterError,
                redis.exceptions.ReadOnlyError,
            ):
                self.reload()
                raise
        raise redis.exceptions.ClusterError(f"No answer after {MAX_REDIRECTS} redirections")

    async def _owner(self, key: str) -> tuple[str, int]:
        """The master of the key's slot in the current map; the first call waits (at most one
        timeout) for the map to load."""
        if not self.client.nodes_manager.slots_cache:
            reload = self.reload()
            try:
                await asyncio.wait_for(asyncio.shield(reload), self.timeout_s)
            except TimeoutError:
                raise redis.exceptions.TimeoutError("Timeout loading the cluster map") from None
            if not self.client.nodes_manager.slots_cache:
                raise redis.exceptions.ClusterError(
                    f"No cluster map: {self._reload_error}"
                ) from self._reload_error
        try:
            node = self.client.get_node_from_key(key)
        except redis.exceptions.SlotNotCoveredError:
            self.reload()
            raise
        if node is None:
            self.reload()
            raise redis.exceptions.ClusterError("No cluster node serves this slot")
        return str(node.host), int(node.port)

    def _node(self, host: str, port: int) -> RedisMux:
        name = f"{host}:{port}"
        mux = self._nodes.get(name)
        if mux is None:
            mux = self._nodes[name] = RedisMux(
                self.url,
                timeout_s=self.timeout_s,
                connect_timeout_s=self.connect_timeout_s,
                address=(host, port),
            )
        return mux

    def reload(self) -> asyncio.Task[None]:
        """Reload the slot map in the background unless a reload is already running."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._reload_map())
        return self._reload

    async def _reload_map(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self._reloaded_at + MAP_RELOAD_INTERVAL_S - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        try:
            await self.client.nodes_manager.initialize()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            self._reload_error = e
            log.debug("cluster map reload failed: %s", e)
            return
        finally:
            self._reloaded_at = loop.time()
        self._reload_error = None
        masters = {f"{node.host}:{node.port}" for node in self.client.get_primaries()}
        for name in [n for n in self._nodes if n not in masters]:
            # No longer a master: calls still on the way time out first, then it closes.
            loop.call_later(self.timeout_s, self._nodes.pop(name).close)

    @property
    def nodes(self) -> list[str]:
        """host:port of the masters this process holds connections to."""
        return sorted(self._nodes)

    async def aclose(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
        for mux in self._nodes.values():
            mux.close()
        self._nodes.clear()


def _reply_error(reply: redis.exceptions.RedisError) -> redis.exceptions.RedisError:
    """The exception redis-py raises for the same error reply (MovedError, NoScriptError,
    ConnectionError for "max number of clients reached", ...); a refusal to talk to us at all
    (NOAUTH, WRONGPASS) is an AuthenticationError, a ConnectionError."""
    if type(reply) is not redis.exceptions.ResponseError:
        return reply  # already redis-py's class (an undecodable reply)
    error: redis.exceptions.RedisError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return error
