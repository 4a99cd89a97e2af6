"""The client connection, before a request reaches the app: uvicorn's httptools protocol with
limits on the request head (bytes, header fields, time) and on open connections per process.

Chunked trailer fields are dropped here, so they never join the request's headers.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
from functools import partial
from typing import Any, NamedTuple, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.access_log import AccessLog, open_access_log
from proxy.config import Settings
from proxy.errors import InvalidRequest

LINGER_S = 1.0  # how long a refused client may go on sending before the connection closes


class HeadLimits(NamedTuple):
    max_bytes: int  # request line + header fields of one request
    max_headers: int
    timeout_s: float  # from connection start, or the end of the previous response
    max_connections: int  # open client connections per process


class HeaderFieldsTooLarge(InvalidRequest):
    status_code = 431
    code = "request_header_fields_too_large"


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a refused head (the reply is sent)."""


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """The `http` setting for uvicorn: ClientConnection with the limits of `settings`."""
    limits = HeadLimits(
        max_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    # uvicorn calls its `http` setting as it would a class, with config, server_state and
    # app_state as keywords; a partial of a module-level class also pickles into the
    # worker processes that --workers spawns.
    access_log = open_access_log(settings.access_log)
    return cast(
        "type[asyncio.Protocol]",
        partial(ClientConnection, limits=limits, access_log=access_log),
    )


class ClientConnection(HttpToolsProtocol):
    """One client connection: uvicorn's HTTP/1.1 handling, inside the head limits."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        # The access log of heads answered here, which the app never sees (uvicorn's own
        # `access_log` is a flag, off).
        self.refusal_log = access_log
        self.awaiting_head = True  # between two requests, or reading a request head
        self.head_bytes = 0
        self.header_count = 0
        self.refused = False  # over a limit: nothing more is parsed
        self.discard_left = 0  # bytes still read and dropped after a 431
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Over the cap: close before the connection takes any memory or a timer.
            self.transport = transport
            self.refused = True
            self.logger.debug("Connection closed: %d connections open", len(self.connections))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            self._discard(len(data))
            return
        self._unset_keepalive_if_required()
        while data:
            if self.awaiting_head:
                # Feed no more than the head may still take: what lies beyond is either the
                # body (fed once the head is complete) or over the limit (never buffered).
                room = self.limits.max_bytes - self.head_bytes
                piece, data = data[:room], data[room:]
                self.head_bytes += len(piece)
            else:
                piece, data = data, b""
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                if not self.refused:
                    message = "Invalid HTTP request received."
                    self.logger.warning(message)
                    self.send_400_response(message)
                return
            if self.awaiting_head and self.head_bytes >= self.limits.max_bytes:
                self._refuse(f"Request line and headers exceed {self.limits.max_bytes} bytes")
                return

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.awaiting_head:
            return  # a chunked body's trailer fields: not request headers, never forwarded
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            self._refuse(f"Request has more than {self.limits.max_headers} header fields")
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.awaiting_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.awaiting_head = True
        self.head_bytes = 0
        self.header_count = 0
        super().on_message_complete()
        self._arm_head_timer()  # due now if the request was answered before its body ended

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        """Start the clock for the next head: expected, and no response still owed."""
        answered = self.cycle is None or self.cycle.response_complete
        if self.awaiting_head and answered and not self.transport.is_closing():
            self._cancel_head_timer()
            self.head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.awaiting_head and not self.transport.is_closing():
            self.logger.debug("Connection closed: no request head in %gs", self.limits.timeout_s)
            self.transport.close()

    def _refuse(self, message: str) -> None:
        """Answer 431 (mid-response, for a pipelined head, only close)."""
        self.refused = True
        self._cancel_head_timer()
        self.logger.debug("Request head refused: %s", message)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        error = HeaderFieldsTooLarge(message)
        request_id = os.urandom(16).hex()
        body = error.json_bytes()
        content = [STATUS_LINE[error.status_code]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: %s\r\n" % request_id.encode(),  # as every answer has
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        self._log(request_id, error.status_code, error.error_type)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with unread bytes would reset the connection, and a client that is still
        # sending its head would lose the 431. So: end our side, then read and drop a bounded
        # amount for a bounded time; the client's own close or either bound ends it.
        self.transport.write_eof()
        self.discard_left = self.limits.max_bytes
        self.head_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are no HTTP request; logged (with an id of its own)."""
        super().send_400_response(msg)
        self._log(os.urandom(16).hex(), 400, InvalidRequest.error_type, parsed=False)

    def _log(self, request_id: str, status: int, error: str, *, parsed: bool = True) -> None:
        """The access line of a head answered here, with its method and path once its request
        line was read (`parsed`: the parser did not fail)."""
        if self.refusal_log is None:
            return
        method: str | None = None
        path: str | None = None
        if parsed:
            try:
                raw_path = httptools.parse_url(self.url).path  # no url: no request line yet
                method = self.parser.get_method().decode("ascii")
                path = urllib.parse.unquote(raw_path.decode("ascii")) if raw_path else None
            except (AttributeError, httptools.HttpParserError, UnicodeDecodeError):
                pass  # a request line cut at the limit
        self.refusal_log.write(
            ts=time.time(),
            request_id=request_id,
            method=method,
            path=path,
            status=status,
            latency_ms=0.0,
            state={"error": error},
        )

    def _discard(self, size: int) -> None:
        self.discard_left -= size
        if self.discard_left < 0 and not self.transport.is_closing():
            self.transport.close()
