"""The Starlette application: routes, the request-id middleware, lifespan and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import admin, endpoints
from proxy.access_log import AccessLog, open_access_log
from proxy.admission import Admission
from proxy.config import Settings
from proxy.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    StoreUnavailable,
)
from proxy.gateway import Gateway
from proxy.health import Health
from proxy.keys import Keyring
from proxy.ledger import Ledger
from proxy.lifecycle import CLIENT_CLOSED
from proxy.limits import LEASE_MARGIN_MS, Limiter
from proxy.metrics import Metrics
from proxy.models import ModelCatalog
from proxy.paths import PassthroughPaths, refused_path
from proxy.routing import Registry
from proxy.spool import Spool
from proxy.startup import announce
from proxy.store import Store, StoreDown, open_store
from proxy.sweeper import Sweeper
from proxy.upstream import Upstream

log = logging.getLogger("tollgate")
CHAT_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/api/chat/completions",
    "/api/v1/chat/completions",
    "/api/ai/chat/completions",
)
# The metered surfaces beside chat, each with its handler; the `/api/v1/` forms answer alike.
SURFACE_PATHS = {
    "/responses": endpoints.responses,
    "/completions": endpoints.completions,
    "/embeddings": endpoints.embeddings,
    "/messages": endpoints.messages,
    "/messages/count_tokens": endpoints.count_tokens,
}
_CLIENT_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# After uvicorn's graceful-shutdown timeout it cancels the requests still running and at once
# runs the lifespan shutdown; their settlement (one store round trip, or the spool) gets this
# long before the store is closed under it.
SETTLE_GRACE_S = 5.0


async def _drain(requests: set[asyncio.Task[object]], timeout_s: float) -> None:
    """Wait (bounded) until no request of this process is still running (or settling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while requests and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if requests:
        log.warning("closing the store with %d request(s) still settling", len(requests))


class RequestIdMiddleware:
    """Gives every request Tollgate's own unique id and every response `x-request-id`.

    The id is never the client's: admission and settlement are keyed by it, so two requests
    must never share one. A sane id the client sent (`x-client-request-id`, else
    `x-request-id`) is kept beside it and echoed as `x-client-request-id`. Request targets
    that could address another upstream path are refused here, before any route. It also
    keeps the requests in progress, so shutdown can wait for their settlement, and is the
    last resort: an unexpected exception becomes an OpenAI-style 500 that names no
    internals, with the same header.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        requests: set[asyncio.Task[object]],
        access_log: AccessLog | None = None,
    ) -> None:
        self.app = app
        self.requests = requests
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        self.requests.add(task)
        try:
            await self._call(scope, receive, send)
        finally:
            self.requests.discard(task)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        ts, began = time.time(), time.perf_counter()
        request_id = os.urandom(16).hex().encode()  # as random as uuid4, a quarter the CPU
        extra = [(b"x-request-id", request_id)]
        client_id = _client_request_id(scope["headers"])
        if client_id is not None:
            extra.append((b"x-client-request-id", client_id))
        state = scope.setdefault("state", {})
        state["request_id"] = rid = request_id.decode()
        state["client_request_id"] = client_id.decode() if client_id is not None else None
        status = 0  # the answer's, once its head is sent

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            refusal = refused_path(scope.get("raw_path") or scope["path"].encode())
            if refusal is not None:
                await _render(InvalidRequest(refusal), scope)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error in request %s", rid)
                if status:
                    raise
                await _render(InternalError(), scope)(scope, receive, send_with_id)
        finally:
            if self.access_log is not None:
                self.access_log.write(
                    ts=ts,
                    request_id=rid,
                    method=scope["method"],
                    path=scope["path"],
                    status=status or CLIENT_CLOSED,  # no answer: the client or server ended it
                    latency_ms=round((time.perf_counter() - began) * 1000, 1),
                    state=state,
                )


def _client_request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The client's own id for its request, if sane: `x-client-request-id`, else `x-request-id`."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"x-client-request-id" and _CLIENT_REQUEST_ID.match(value):
            return value
        if name == b"x-request-id" and found is None and _CLIENT_REQUEST_ID.match(value):
            found = value
    return found


def _render(error: ProxyError, scope: Scope) -> Response:
    """The error's JSON answer; its type is noted for the access log."""
    scope["state"]["error"] = error.error_type
    return Response(
        error.json_bytes(),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


async def proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return _render(exc, request.scope)


async def store_down(request: Request, exc: Exception) -> Response:
    """The store failed where no handler decided otherwise (admin API, usage queries): 503."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.metrics.store_errors.inc()
    log.warning("store unreachable answering %s %s: %s", request.method, request.url.path, exc)
    return _render(StoreUnavailable("The store is unreachable; try again shortly"), request.scope)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _render(MethodNotAllowed(f"Method {request.method} not allowed here"), request.scope)
    return _render(NotFound(f"Unknown path {request.url.path}"), request.scope)


def build_gateway(
    settings: Settings,
    *,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    store = store or open_store(settings)
    lease_ms = int(settings.upstream_timeout_s * 1000) + LEASE_MARGIN_MS
    limiter = Limiter(store, lease_ms=lease_ms, retention_days=settings.usage_retention_days)
    metrics = Metrics(
        key_label=settings.metrics_key_label,
        # A price for `upstream/model` names the model `model` too.
        known_models={n for name in settings.prices.models for n in (name, name.split("/")[-1])},
        multiprocess_dir=settings.metrics_multiprocess,
    )
    ledger = Ledger(limiter, Spool(settings.spool_dir), metrics)
    upstreams = [
        Upstream(config, settings, metrics, transport=transport)
        for config in settings.upstream_configs()
    ]
    registry = Registry(upstreams)
    return Gateway(
        settings=settings,
        store=store,
        metrics=metrics,
        keyring=Keyring(store),
        admission=Admission(limiter, ledger, metrics, fail_open=settings.fail_open),
        ledger=ledger,
        upstreams=upstreams,
        selection=registry,
        health=Health(
            [u.name for u in upstreams],
            metrics.upstream_healthy,
            threshold=settings.upstream_failure_threshold,
            cooldown_s=settings.upstream_cooldown_s,
        ),
        models=ModelCatalog(
            [u for u in registry.upstreams if u.api == "openai"],
            metrics,
            refresh_s=settings.models_cache_s,
            timeout_s=settings.upstream_timeout_s,
        ),
        passthrough_paths=PassthroughPaths(settings.passthrough_paths),
        sweeper=Sweeper(store, limiter, settings.prices, every_ms=min(30_000, lease_ms // 2)),
    )


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The ASGI app. `store` and `transport` let tests and the demo bring their own."""
    requests: set[asyncio.Task[object]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = build_gateway(settings, store=store, transport=transport)
        app.state.gateway = gateway
        announce(settings)
        await gateway.models.start()
        loops = [
            asyncio.create_task(gateway.ledger.replay_forever()),
            asyncio.create_task(gateway.sweeper.sweep_forever(gateway.metrics)),
            asyncio.create_task(gateway.models.refresh_forever()),
        ]
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
            await _drain(requests, SETTLE_GRACE_S)
            await gateway.aclose()

    routes = [Route(path, endpoints.chat_completions, methods=["POST"]) for path in CHAT_PATHS]
    for prefix in ("/v1", "/api/v1"):
        routes += [
            Route(f"{prefix}/models", endpoints.list_models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", endpoints.get_model, methods=["GET"]),
            *(
                Route(prefix + path, handler, methods=["POST"])
                for path, handler in SURFACE_PATHS.items()
            ),
            # Anything else below /v1 reaches the upstream only when the operator lists it.
            Route(
                f"{prefix}/{{rest:path}}",
                endpoints.passthrough,
                methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            ),
        ]
    routes += [
        Route("/api/v1/chat/models", endpoints.list_models, methods=["GET"]),
        Route("/anthropic/v1/messages", endpoints.messages, methods=["POST"]),
        Route("/anthropic/v1/messages/count_tokens", endpoints.count_tokens, methods=["POST"]),
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/readyz/store", endpoints.readyz_store, methods=["GET"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        *admin.routes,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ProxyError: proxy_error,
            HTTPException: http_error,
            StoreDown: store_down,
        },
    )
    # A slash redirect would build its location from the client's Host header.
    app.router.redirect_slashes = False
    access_log = open_access_log(settings.access_log)
    app.add_middleware(RequestIdMiddleware, requests=requests, access_log=access_log)
    return app
