"""The upstream hop: one shared httpx transport (Tollgate's HTTP/1.1 one).

`Upstream.failures()` is the one boundary where transport errors and deadlines become
UpstreamFailed/UpstreamTimeout and every upstream error is counted, once. The client's own
credential never leaves: the operator's upstream key is sent instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from proxy.config import Settings
from proxy.errors import InvalidRequest, UpstreamFailed, UpstreamTimeout
from proxy.http1 import Http1Transport
from proxy.metrics import Metrics
from proxy.registry import UpstreamConfig

# The only client headers that go upstream. Everything else stays here: the client's
# credential and cookies, hop-by-hop fields, `OpenAI-Organization`/`OpenAI-Project` (the
# operator's key decides those), `X-Forwarded-*`, the SDKs' telemetry and anything unknown.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        b"content-type", b"accept", b"user-agent", b"openai-beta",
        b"anthropic-version", b"anthropic-beta",
    }
)  # fmt: skip
# Response headers that describe the upstream hop or the operator's own upstream quota.
_DROP_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding",
        "upgrade", "content-length", "content-encoding", "set-cookie", "server", "date",
        "x-request-id", "x-client-request-id", "retry-after", "retry-after-ms", "ratelimit",
        "ratelimit-policy", "location", "anthropic-organization-id",
    }
)  # fmt: skip
# Prefixes of response headers that describe the operator's upstream quota (OpenAI's, Anthropic's).
_DROP_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


ANTHROPIC_VERSION = b"2023-06-01"  # sent to an anthropic upstream when the client named none


def request_headers(
    client_headers: list[tuple[bytes, bytes]],
    *,
    request_id: str,
    client_request_id: str | None = None,
    forwarded: frozenset[bytes] = FORWARDED_REQUEST_HEADERS,
) -> list[tuple[bytes, bytes]]:
    """The allowed client headers and Tollgate's ids (the upstream adds its credential)."""
    out = [(k, v) for k, v in client_headers if k in forwarded]  # ASGI names are lowercase
    out.append((b"accept-encoding", b"identity"))  # bytes are relayed as they come
    out.append((b"x-request-id", request_id.encode()))
    if client_request_id is not None:
        out.append((b"x-client-request-id", client_request_id.encode()))
    return out


def response_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (k, v)
        for k, v in upstream.headers.raw
        if (name := k.decode("latin-1").lower()) not in _DROP_RESPONSE
        and not name.startswith(_DROP_RESPONSE_PREFIXES)
    ]


class Upstream:
    """One upstream of the registry and its transport (opened and closed by the lifespan).

    Requests go straight to the transport's `handle_async_request`: httpx's Request and
    Response types stay, and AsyncClient's per-request machinery (auth flow, redirects, cookies,
    hooks), which our calls never need, is skipped; `proxy/http1.py` moves the bytes (about
    70 µs of CPU per request; README, Performance).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        settings: Settings,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = config.name
        self.api = config.api
        self.config = config
        self.metrics = metrics
        # Each URL is the base its API's own SDK takes (https://api.openai.com/v1,
        # https://api.anthropic.com); surfaces' paths (/chat/completions, /messages) are relative
        # to the API's /v1, which Anthropic's base leaves out.
        self.base_url = config.url
        if config.api == "anthropic" and not config.url.endswith("/v1"):
            self.base_url = config.url + "/v1"
        # The operator's credential, in the header the upstream's dialect expects.
        self._credential: tuple[bytes, bytes] | None = None
        if config.api_key:
            self._credential = (
                (b"x-api-key", config.api_key.encode())
                if config.api == "anthropic"
                else (b"authorization", b"Bearer " + config.api_key.encode())
            )
        # The client headers that go upstream: ours, plus the operator's TOLLGATE_FORWARD_HEADERS.
        self.forwarded_headers = FORWARDED_REQUEST_HEADERS.union(
            name.encode() for name in settings.forward_headers
        )
        self.transport = transport or Http1Transport(
            max_connections=1024,
            max_keepalive_connections=256,
            ca_file=settings.upstream_ca_file,  # a private CA, on top of the default store
        )
        # Only connecting is bounded here; the whole exchange has its own deadline, and an
        # attempt with a fallback after it its own bound on the wait for the response head.
        connect_s = config.connect_timeout_s or min(10.0, settings.upstream_timeout_s)
        self.attempt_timeout_s = config.attempt_timeout_s or settings.upstream_attempt_timeout_s
        self._timeouts = {"timeout": {"connect": connect_s, "pool": connect_s}}
        self._urls: dict[str, httpx.URL] = {}  # parsed once per path; queries are rare

    def headers(
        self,
        client_headers: list[tuple[bytes, bytes]],
        *,
        request_id: str,
        client_request_id: str | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """What goes to this upstream: the allowed client headers, Tollgate's ids and the
        operator's credential (never the client's)."""
        out = request_headers(
            client_headers,
            request_id=request_id,
            client_request_id=client_request_id,
            forwarded=self.forwarded_headers,
        )
        if self._credential is not None:
            out.append(self._credential)
        if self.api == "anthropic" and not any(k == b"anthropic-version" for k, _ in out):
            out.append((b"anthropic-version", ANTHROPIC_VERSION))
        return out

    def _url(self, path: str, query: bytes) -> httpx.URL | str:
        if query:
            return self.base_url + path + "?" + query.decode("latin-1")
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < 1024:  # passed-through paths are the client's choice
                self._urls[path] = url
        return url

    @contextlib.contextmanager
    def failures(self, timeout_s: float) -> Iterator[None]:
        """Around every upstream call (send, body, stream): a deadline that ran out becomes
        UpstreamTimeout, a transport error UpstreamFailed; each is counted here, once."""
        try:
            yield
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout(timeout_s) from None
        except UpstreamFailed as exc:
            self.metrics.upstream_errors.labels(exc.reason).inc()
            raise
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.labels("connect").inc()
            raise UpstreamFailed(
                f"Upstream connection failed: {type(exc).__name__}", reason="connect"
            ) from exc

    async def send(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[bytes, bytes]],
        content: bytes | None,
        query: bytes = b"",
    ) -> httpx.Response:
        """Send and return as soon as the response head arrives (body still unread).

        Call it inside `failures()`, which translates what the transport raises."""
        try:
            request = httpx.Request(
                method,
                self._url(path, query),
                headers=headers,
                content=content,
                extensions=self._timeouts,
            )
        except httpx.InvalidURL:
            raise InvalidRequest("This path cannot be forwarded upstream") from None
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()
