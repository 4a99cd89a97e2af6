"""Client-facing handlers. The chat pipeline reads top to bottom:
authenticate -> validate -> admit (limits + credits) -> upstream -> relay -> settle.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from proxy import paths
from proxy.errors import (
    AuthenticationFailed,
    ClientClosed,
    InsufficientCredits,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    ProxyError,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from proxy.gateway import Gateway
from proxy.keys import PresentedKey, parse_key
from proxy.limits import Decision, rate_limit_headers, retry_headers
from proxy.metering import (
    estimate_prompt_tokens,
    max_completion_tokens,
    usage_from_body,
)
from proxy.relay import CLIENT_CLOSED, Admitted, ClientWatch, Exchange, RelayResponse
from proxy.store import StoreDown
from proxy.upstream import request_headers, response_headers
from proxy.validation import MAX_MODEL_CHARS, is_utf8, parse_json_object, validate_chat

_USAGE_OPTION = b'"stream_options":{"include_usage":true},'
_LIMIT_MESSAGES = {
    "requests": "Rate limit reached for requests per minute (limit: {rpm}). Try again in {wait}.",
    "tokens": "Rate limit reached for tokens per minute (limit: {tpm}). Try again in {wait}.",
    "concurrency": "Too many concurrent requests for this key. Try again when one has finished.",
}


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


def _refusal(decision: Decision, model: str, gateway: Gateway) -> ProxyError:
    metrics = gateway.metrics
    name = decision.key_name
    verdict = decision.verdict
    if verdict in ("unknown_key", "revoked"):
        return AuthenticationFailed()
    if verdict == "model_not_allowed":
        return ModelNotAllowed(f"This API key is not allowed to use the model '{model}'")
    if verdict == "unpriced":
        return ModelNotAllowed(
            f"The model '{model}' has no price, so keys with a credit balance cannot use it"
        )
    if verdict == "credits":
        metrics.credit_rejections.labels(*metrics.keyed(name)).inc()
        return InsufficientCredits(
            "Insufficient credits: the balance cannot cover this request's maximum cost. "
            "Add credits or lower max_tokens."
        )
    metrics.rate_limited.labels(*metrics.keyed(name, verdict)).inc()
    wait = f"{decision.retry_after_ms / 1000:.3g}s"
    message = _LIMIT_MESSAGES[verdict].format(rpm=decision.rpm, tpm=decision.tpm, wait=wait)
    headers = {k.decode(): v.decode() for k, v in rate_limit_headers(decision)}
    return RateLimited(message, headers={**headers, **retry_headers(decision.retry_after_ms)})


async def admit(
    gateway: Gateway,
    presented: PresentedKey,
    admitted: Admitted,
    *,
    token_estimate: int,
    cost_micros: int | None,
) -> tuple[Admitted, Decision]:
    """Authenticate and admit in one store round trip; fail open or closed when it is down."""
    try:
        decision = await gateway.limiter.admit(
            presented,
            request_id=admitted.request_id,
            model=admitted.model,
            token_estimate=token_estimate,
            cost_micros=cost_micros,
            marker=admitted.marker(),
        )
    except StoreDown:
        gateway.metrics.store_errors.inc()
        name = gateway.recent_key_name(presented.key_hash) if gateway.settings.fail_open else None
        if name is None:
            unavailable = StoreUnavailable("The rate-limit store is unreachable; try again shortly")
            gateway.metrics.answered(admitted.route, admitted.model, unavailable.status_code, "")
            raise unavailable from None
        gateway.metrics.fail_open.inc()
        decision = Decision(verdict="ok", key_name=name)
    else:
        if not decision.admitted:
            refusal = _refusal(decision, admitted.model, gateway)
            gateway.metrics.answered(
                admitted.route, admitted.model, refusal.status_code, decision.key_name
            )
            raise refusal
        gateway.remember_key(presented.key_hash, decision.key_name)
    admitted.key_name = decision.key_name
    return admitted, decision


def _arrival(request: Request, presented: PresentedKey, **fields: Any) -> Admitted:
    """What is known of a request before admission; its deadline starts now."""
    settings = gateway_of(request).settings
    return Admitted(
        request_id=request.scope["state"]["request_id"],
        client_request_id=request.scope["state"]["client_request_id"],
        key_id=presented.key_id,
        key_name="",
        path=request.scope["path"],  # request.url would build a whole URL
        started=time.perf_counter(),
        deadline=asyncio.get_running_loop().time() + settings.upstream_timeout_s,
        ts=time.time(),
        **fields,
    )


def _with_usage_option(raw: bytes, body: dict[str, Any]) -> bytes:
    """Ask a streaming upstream for its final usage chunk, changing nothing else."""
    if "stream_options" not in body:
        start = raw.index(b"{") + 1
        return raw[:start] + _USAGE_OPTION + raw[start:]
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return raw
    body["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return json.dumps(body).encode()


async def chat_completions(request: Request) -> Response:
    gateway = gateway_of(request)
    try:
        presented, arrival, raw, token_estimate, cost = await _chat_request(gateway, request)
    except ProxyError as exc:  # refused before admission: counted without model or key
        gateway.metrics.answered("chat_completions", "", exc.status_code, "")
        raise
    admitted, decision = await admit(
        gateway, presented, arrival, token_estimate=token_estimate, cost_micros=cost
    )
    return await forward(
        gateway,
        request,
        Exchange(gateway, admitted),
        decision,
        upstream_path="/chat/completions",
        content=raw,
        expect_chat=True,
    )


async def _chat_request(
    gateway: Gateway, request: Request
) -> tuple[PresentedKey, Admitted, bytes, int, int | None]:
    """Authenticate, read and validate a chat request; estimate its tokens and worst cost."""
    settings = gateway.settings
    presented = authenticate(request)
    raw = await read_body(request, settings.max_body_bytes)
    body = parse_json_object(raw)
    model = validate_chat(body)
    stream = body.get("stream") is True
    if stream and settings.inject_stream_usage:
        raw = _with_usage_option(raw, body)
    prompt_estimate = estimate_prompt_tokens(body)
    completion_max = max_completion_tokens(body, settings.default_max_tokens)
    cost = (
        settings.prices.cost_micros(model, prompt_estimate, completion_max)
        if settings.prices.price(model) is not None
        else None
    )
    arrival = _arrival(
        request,
        presented,
        model=model,
        route="chat_completions",
        stream=stream,
        prompt_estimate=prompt_estimate,
    )
    return presented, arrival, raw, prompt_estimate + completion_max, cost


async def forward(
    gateway: Gateway,
    request: Request,
    exchange: Exchange,
    decision: Decision,
    *,
    upstream_path: str,
    content: bytes | None,
    expect_chat: bool,
) -> Response:
    """Send an admitted request upstream and answer the client; settles on every path.

    Until the answer is ready a watcher cancels the upstream call as soon as the client goes
    away (a stream's relay has its own), so it is closed and settled as 499 at once.
    """
    admitted = exchange.admitted
    limit_headers = rate_limit_headers(decision)
    gateway.metrics.inflight.inc()
    watch = ClientWatch(request.receive)
    try:
        try:
            response = await _send(gateway, request, exchange, upstream_path, content)
            is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
            relay = response.status_code < 300 and is_sse and (admitted.stream or not expect_chat)
            payload = b"" if relay else await _read(gateway, exchange)
        finally:
            watch.stop()
        headers = response_headers(response) + limit_headers
        if relay:
            return RelayResponse(exchange, status=response.status_code, headers=headers)  # type: ignore[return-value]
        status = response.status_code
        if status >= 500 or 300 <= status < 400:
            # A redirect would name the upstream's own host; Tollgate follows none.
            gateway.metrics.upstream_errors.labels("status").inc()
            await exchange.finish(status=502, billable=False)
            raise UpstreamFailed(f"Upstream answered with status {status}", reason="status")
        if status < 300 and (expect_chat or b'"usage"' in payload):
            parsed = _json_or_none(payload)
            if expect_chat and (parsed is None or admitted.stream):
                gateway.metrics.upstream_errors.labels("invalid").inc()
                await exchange.finish(status=502, billable=False)
                raise UpstreamFailed(
                    "Upstream answered with a body that is not a chat completion", reason="invalid"
                )
            exchange.usage = usage_from_body(parsed) if parsed is not None else None
        await exchange.finish(status=status, billable=status < 400)
        answer = Response(payload, status_code=status)
        answer.raw_headers.extend(headers)
        return answer
    except ProxyError as exc:
        # Not billed when the upstream could not be reached at all; a timeout may have run.
        unreached = isinstance(exc, UpstreamFailed) and exchange.response is None
        await exchange.finish(status=exc.status_code, billable=not unreached)
        exc.headers.update({k.decode(): v.decode() for k, v in limit_headers})
        raise
    except asyncio.CancelledError:
        if not watch.client_gone:
            await exchange.finish(status=500)
            raise
        watch.task.uncancel()
        await exchange.finish(status=CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it
    except BaseException:
        await exchange.finish(status=500)
        raise


async def _send(
    gateway: Gateway, request: Request, exchange: Exchange, path: str, content: bytes | None
) -> httpx.Response:
    """The upstream's response head, within the exchange's deadline."""
    headers = request_headers(
        request.headers.raw,
        api_key=gateway.settings.upstream_api_key,
        request_id=exchange.admitted.request_id,
        client_request_id=exchange.admitted.client_request_id,
        forwarded=gateway.upstream.forwarded_headers,
    )
    try:
        async with asyncio.timeout_at(exchange.admitted.deadline):
            response = await gateway.upstream.send(
                request.method,
                path,
                headers=headers,
                content=content,
                query=request.scope.get("query_string", b""),
            )
    except TimeoutError:
        gateway.metrics.upstream_errors.labels("timeout").inc()
        raise UpstreamTimeout(gateway.settings.upstream_timeout_s) from None
    except UpstreamFailed as exc:
        gateway.metrics.upstream_errors.labels(exc.reason).inc()
        raise
    exchange.response = response
    exchange.first_byte()
    return response


async def _read(gateway: Gateway, exchange: Exchange) -> bytes:
    """The whole upstream body, within the exchange's deadline."""
    assert exchange.response is not None
    try:
        async with asyncio.timeout_at(exchange.admitted.deadline):
            return await exchange.response.aread()
    except TimeoutError:
        gateway.metrics.upstream_errors.labels("timeout").inc()
        raise UpstreamTimeout(gateway.settings.upstream_timeout_s) from None
    except httpx.HTTPError as exc:
        gateway.metrics.upstream_errors.labels("connect").inc()
        raise UpstreamFailed("Upstream connection failed mid-response", reason="connect") from exc


def _json_or_none(payload: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


async def surface(request: Request) -> Response:
    """Embeddings, legacy completions, Responses, Anthropic messages: authenticated,
    request-limited and charged from the usage their answer reports."""
    path: str = request.scope["path"]
    return await _metered_passthrough(request, "/" + path.rsplit("/", 1)[1])


async def passthrough(request: Request) -> Response:
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
        gateway.metrics.answered("passthrough", "", NotFound.status_code, "")
        raise NotFound(f"Unknown path {path}")
    raw_path: bytes = request.scope.get("raw_path") or path.encode()
    return await _metered_passthrough(request, paths.upstream_path(raw_path, 2 if api_form else 1))


async def _metered_passthrough(request: Request, path: str) -> Response:
    """Authenticated and request-limited; metered when the answer reports usage."""
    gateway = gateway_of(request)
    try:
        presented = authenticate(request)
        raw = await read_body(request, gateway.settings.max_body_bytes)
        body = _json_or_none(raw) if raw else None
        model = body.get("model") if body is not None else None
        if isinstance(model, str) and len(model) > MAX_MODEL_CHARS:
            raise InvalidRequest(
                f"model must be at most {MAX_MODEL_CHARS} characters", param="model"
            )
    except ProxyError as exc:
        gateway.metrics.answered("passthrough", "", exc.status_code, "")
        raise
    model = model if isinstance(model, str) and model and is_utf8(model) else "-"
    arrival = _arrival(
        request,
        presented,
        model=model,
        route="passthrough",
        stream=bool(body and body.get("stream") is True),
        prompt_estimate=0,
    )
    admitted, decision = await admit(gateway, presented, arrival, token_estimate=0, cost_micros=0)
    return await forward(
        gateway,
        request,
        Exchange(gateway, admitted),
        decision,
        upstream_path=path,
        content=raw or None,
        expect_chat=False,
    )


async def _key_models(request: Request) -> tuple[Gateway, list[str] | None]:
    """Authenticate a models request; returns the key's allowed models (None = all)."""
    gateway = gateway_of(request)
    presented = authenticate(request)
    try:
        record = await gateway.keyring.authenticate(presented)
    except StoreDown:
        gateway.metrics.store_errors.inc()
        raise StoreUnavailable("The key store is unreachable; try again shortly") from None
    if record is False:
        raise AuthenticationFailed()
    return gateway, record if isinstance(record, list) else None


async def list_models(request: Request) -> Response:
    gateway, allowed = await _key_models(request)
    models = await gateway.models.current()
    if allowed is not None:
        models = [m for m in models if m["id"] in allowed]
    return JSONResponse({"object": "list", "data": models})


async def get_model(request: Request) -> Response:
    gateway, allowed = await _key_models(request)
    model_id = request.path_params["model"]
    for model in await gateway.models.current():
        if model["id"] == model_id and (allowed is None or model_id in allowed):
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
