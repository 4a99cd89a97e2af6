"""Client-facing handlers. Each reads top to bottom:
authenticate -> parse (the surface) -> admit -> run (the Lifecycle, which settles).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from proxy import paths, provider
from proxy.access_log import Entry
from proxy.admission import EXPIRED, Arrival
from proxy.errors import (
    AuthenticationFailed,
    ClientClosed,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ProxyError,
    RequestTooLarge,
    StoreUnavailable,
)
from proxy.gateway import Gateway
from proxy.keys import PresentedKey, model_allowed, parse_key
from proxy.lifecycle import Lifecycle
from proxy.provider import Preferences
from proxy.store import StoreDown
from proxy.surfaces.anthropic import Messages, TokenCount
from proxy.surfaces.base import Parsed, Surface
from proxy.surfaces.chat import ChatCompletions
from proxy.surfaces.completions import Completions
from proxy.surfaces.embeddings import Embeddings
from proxy.surfaces.passthrough import Passthrough
from proxy.surfaces.responses import Responses

CHAT = ChatCompletions()
RESPONSES = Responses()
COMPLETIONS = Completions()
EMBEDDINGS = Embeddings()
PASSTHROUGH = Passthrough()
MESSAGES = Messages()
TOKEN_COUNT = TokenCount()


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def authenticate(request: Request) -> PresentedKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in the Authorization header "
            "(Authorization: Bearer YOUR_KEY)."
        )
    presented = parse_key(token.strip())
    if presented is None:
        raise AuthenticationFailed()
    return presented


def authenticate_anthropic(request: Request) -> PresentedKey:
    """The Anthropic routes: the key as `x-api-key` (as the Anthropic SDK sends it), else as
    `Authorization: Bearer`."""
    token = request.headers.get("x-api-key")
    if token is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token if scheme.lower() == "bearer" else ""
    if not token:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in the x-api-key header "
            "(or as Authorization: Bearer YOUR_KEY)."
        )
    presented = parse_key(token.strip())
    if presented is None:
        raise AuthenticationFailed()
    return presented


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge(f"Request body is larger than the limit of {max_bytes} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > max_bytes:
                raise RequestTooLarge(f"Request body is larger than the limit of {max_bytes} bytes")
            parts.append(part)
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection before its body was read") from None
    return b"".join(parts)


async def chat_completions(request: Request) -> ASGIApp:
    return await _metered(request, CHAT, "/chat/completions")


async def responses(request: Request) -> ASGIApp:
    return await _metered(request, RESPONSES, "/responses")


async def completions(request: Request) -> ASGIApp:
    return await _metered(request, COMPLETIONS, "/completions")


async def embeddings(request: Request) -> ASGIApp:
    return await _metered(request, EMBEDDINGS, "/embeddings")


async def messages(request: Request) -> ASGIApp:
    return await _anthropic(request, MESSAGES, "/messages")


async def count_tokens(request: Request) -> ASGIApp:
    return await _anthropic(request, TOKEN_COUNT, "/messages/count_tokens")


async def _anthropic(request: Request, surface: Surface, upstream_path: str) -> ASGIApp:
    """The Anthropic routes: their key forms, and every refusal in that API's error shape
    (same status and headers as the OpenAI routes' answer)."""
    try:
        return await _metered(request, surface, upstream_path, identify=authenticate_anthropic)
    except ProxyError as exc:
        request.scope["state"]["error"] = exc.error_type  # for the access log
        return Response(
            surface.error_body(exc),
            status_code=exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )


async def passthrough(request: Request) -> ASGIApp:
    """Any other /v1/* path: 404 unless the operator lists it in TOLLGATE_PASSTHROUGH_PATHS.

    The operator's upstream key can read files, batches and organisation settings, so a
    client key reaches nothing the operator did not hand out.
    """
    gateway = gateway_of(request)
    path: str = request.scope["path"]
    if request.method == "HEAD":  # Starlette adds it to GET routes; upstreams need none
        raise MethodNotAllowed("Method HEAD not allowed here")
    api_form = path.startswith("/api/v1/")
    if not gateway.passthrough_paths.allows(path[4:] if api_form else path):
        gateway.metrics.answered(PASSTHROUGH.route, "", NotFound.status_code, "")
        raise NotFound(f"Unknown path {path}")
    raw_path: bytes = request.scope.get("raw_path") or path.encode()
    return await _metered(request, PASSTHROUGH, paths.upstream_path(raw_path, 2 if api_form else 1))


async def _metered(
    request: Request,
    surface: Surface,
    upstream_path: str,
    *,
    identify: Callable[[Request], PresentedKey] = authenticate,
) -> ASGIApp:
    """Authenticate, parse, admit; the Lifecycle returned runs the rest as the response."""
    gateway = gateway_of(request)
    settings = gateway.settings
    try:
        presented = identify(request)
        raw = await read_body(request, settings.max_body_bytes)
        parsed = surface.parse(raw, settings)
        route = gateway.selection.route(surface, parsed.model)
        parsed, preferences = _routed(parsed, route.model)
    except ProxyError as exc:  # refused before admission: counted without model or key
        gateway.metrics.answered(surface.route, "", exc.status_code, "")
        raise
    candidates = route.candidates
    if preferences is not None:
        by_name = {u.name: u for u in candidates}
        candidates = tuple(by_name[n] for n in preferences.apply(list(by_name)))
    if not candidates:
        error = ModelNotFound(
            f"The model '{parsed.model}' does not exist or no upstream serves it"
            if not route.candidates
            else f"No upstream the provider preferences allow serves the model '{parsed.model}'",
            param="model",
        )
        gateway.metrics.answered(surface.route, parsed.model, error.status_code, "")
        raise error
    if gateway.health.open:  # some upstream is being skipped
        usable = set(gateway.health.usable([u.name for u in candidates]))
        candidates = tuple(u for u in candidates if u.name in usable)
    candidates = candidates[: settings.upstream_max_attempts]
    scope = request.scope
    arrival = Arrival(
        request_id=scope["state"]["request_id"],
        client_request_id=scope["state"]["client_request_id"],
        key_id=presented.key_id,
        key_name="",
        route=surface.route,
        path=scope["path"],  # request.url would build a whole URL
        started=time.perf_counter(),
        deadline=asyncio.get_running_loop().time() + settings.upstream_timeout_s,
        ts=time.time(),
    )
    cost_micros: int | None = 0
    if parsed.priced:  # the worst case over every upstream that may answer
        prices = settings.prices
        names = [u.name for u in candidates] if prices.by_upstream else []
        cost_micros = prices.worst_cost_micros(
            parsed.model, names, parsed.prompt_estimate, parsed.completion_max
        )
    try:
        decision = await gateway.admission.admit(
            presented,
            arrival,
            model=parsed.model,
            stream=parsed.stream,
            prompt_estimate=parsed.prompt_estimate,
            token_estimate=parsed.prompt_estimate + parsed.completion_max,
            cost_micros=cost_micros,
        )
    except ProxyError:
        if arrival.key_name:  # refused for a key the store knows: the access log names it
            scope["state"]["access"] = Entry(
                key_id=arrival.key_id,
                key_name=arrival.key_name,
                model=parsed.model,
                stream=parsed.stream,
            )
        raise
    return Lifecycle(
        arrival=arrival,
        parsed=parsed,
        surface=surface,
        decision=decision,
        candidates=candidates,
        health=gateway.health,
        upstream_path=upstream_path,
        method=request.method,
        client_headers=scope["headers"],
        query=scope.get("query_string", b""),
        settings=settings,
        ledger=gateway.ledger,
        metrics=gateway.metrics,
        state=scope["state"],
    )


def _routed(parsed: Parsed, model: str) -> tuple[Parsed, Preferences | None]:
    """The request as it goes upstream: for `name/model` the model that upstream knows, and
    without the client's `provider` object (returned, validated). The body is re-encoded only
    then; otherwise the client's bytes go as they are."""
    body = parsed.body
    renamed = model != parsed.model
    if body is None or parsed.content is None or (not renamed and "provider" not in body):
        return parsed, None
    preferences = provider.preferences(body)
    # From the bytes the surface would send (a stream's usage option spliced in).
    forwarded = provider.without_provider(
        json.loads(parsed.content), model=model if renamed else None
    )
    return dataclasses.replace(parsed, model=model, content=forwarded), preferences


async def _key_models(request: Request) -> tuple[Gateway, list[str] | None]:
    """Authenticate a models request; returns the key's allowed model patterns (None = all)."""
    gateway = gateway_of(request)
    presented = authenticate(request)
    try:
        access = await gateway.keyring.authenticate(presented)
    except StoreDown:
        gateway.metrics.store_errors.inc()
        raise StoreUnavailable("The key store is unreachable; try again shortly") from None
    if access.verdict == "expired":
        raise AuthenticationFailed(EXPIRED)
    if access.verdict != "ok":
        raise AuthenticationFailed()
    return gateway, access.models


async def list_models(request: Request) -> Response:
    gateway, allowed = await _key_models(request)
    models = await gateway.models.current()
    models = [m for m in models if model_allowed(allowed, m["id"])]
    return JSONResponse({"object": "list", "data": models})


async def get_model(request: Request) -> Response:
    gateway, allowed = await _key_models(request)
    model_id = request.path_params["model"]
    for model in await gateway.models.current():
        if model["id"] == model_id and model_allowed(allowed, model_id):
            return JSONResponse(model)
    raise NotFound(f"The model '{model_id}' does not exist", param="model")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """This process can take traffic: it has started (its routes answer only once the lifespan
    has) and is not draining (a draining server no longer accepts connections). Never failed
    by the store: a Redis outage must not take every replica out of a load balancer at once,
    or fail-open could serve nobody and fail-closed clients would get connection errors
    instead of clean 503s."""
    gateway_of(request)  # set by the lifespan
    return JSONResponse({"status": "ready"})


async def readyz_store(request: Request) -> Response:
    """The store answers a PING; for monitoring, not for load balancers."""
    if await gateway_of(request).store.ping():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "store unreachable"}, status_code=503)


async def metrics(request: Request) -> Response:
    body, content_type = gateway_of(request).metrics.render()
    return Response(body, media_type=content_type)
