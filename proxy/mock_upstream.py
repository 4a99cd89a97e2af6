"""The built-in mock upstream of `tollgate demo` (and of the tests): an OpenAI-style server.

It answers chat completions (JSON or SSE with a final usage chunk), tool calls and /models.
Some model names ask for misbehaviour, so operators can watch Tollgate handle it:
`mock-slow` (0.2 s between chunks), `mock-hang` (never answers), `mock-error` (500),
`mock-bad-json` (200 that is not JSON), `mock-drop` (stream cut mid-way), `mock-no-usage`
(stream without usage), `mock-gated` (each chunk waits for POST /_mock/release).
GET /_mock/requests shows every request it received, on any path (method, path, raw path,
query, headers, body), except its model list, which it only counts; POST /_mock/reset forgets
them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MODELS = ("gpt-4o-mini", "gpt-4o", "mock-slow", "mock-gated")
REPLY = "Hello from the Tollgate mock upstream! This answer streams word by word."


class MockState:
    """What the mock has seen, for tests that check what reached the upstream."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.model_list_requests = 0  # Tollgate's own GET /models, kept apart from the above
        self.gate = asyncio.Semaphore(0)
        self.open_streams = 0
        self.max_open_streams = 0


class _Recorder:
    """Records every request before routing, so tests see what reached the upstream on any
    path, not only on the routes the mock answers."""

    def __init__(self, app: ASGIApp, *, state: MockState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_mock/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and scope["path"] in ("/models", "/v1/models"):
            self.state.model_list_requests += 1
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = raw.decode("utf-8", "replace")
        self.state.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
                "body": body,
            }
        )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _words(reply: str) -> list[str]:
    words = reply.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    """The assistant message: a tool call when tools are offered, else the fixed reply."""
    tools = body.get("tools")
    if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
        name = tools[0].get("function", {}).get("name", "tool")
        call = {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": name, "arguments": json.dumps({"city": "Paris"})},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if isinstance(body.get("response_format"), dict):
        return {"role": "assistant", "content": json.dumps({"answer": REPLY})}
    return {"role": "assistant", "content": REPLY}


def create_mock_upstream(state: MockState | None = None) -> Starlette:
    state = state or MockState()

    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body.get("model", "")
        if model == "mock-hang":
            await asyncio.sleep(3600)
        if model == "mock-error":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if model == "mock-bad-json":
            return Response(b"<html>not json</html>", media_type="application/json")
        if model == "mock-not-found" or model.startswith("missing-"):
            error = {
                "message": f"The model `{model}` does not exist",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
            return JSONResponse({"error": error}, status_code=404)
        message = _completion(body)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        prompt = _prompt_tokens(body)
        text = message["content"] or message["tool_calls"][0]["function"]["arguments"]
        completion = max(1, len(text) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        ident = "chatcmpl-" + uuid.uuid4().hex
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": ident, "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": finish}],
                    "usage": usage,
                }
            )  # fmt: skip
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return StreamingResponse(
            _stream(state, ident, model, message, usage if include_usage else None),
            media_type="text/event-stream",
        )

    async def models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tollgate-mock"}
                for m in MODELS]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        tokens = max(1, len(json.dumps(body.get("input", ""))) // 4)
        return JSONResponse({
            "object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })  # fmt: skip

    async def release(request: Request) -> Response:
        count = int(request.query_params.get("n", "1"))
        for _ in range(count):
            state.gate.release()
        return JSONResponse({"released": count})

    async def seen(request: Request) -> Response:
        # ASCII JSON: a body may hold text UTF-8 cannot carry (a lone surrogate).
        answer = {
            "requests": state.requests,
            "open_streams": state.open_streams,
            "max_open_streams": state.max_open_streams,
            "model_list_requests": state.model_list_requests,
        }
        return Response(json.dumps(answer), media_type="application/json")

    async def reset(request: Request) -> Response:
        state.requests.clear()
        state.max_open_streams = state.open_streams
        return JSONResponse({"reset": True})

    routes = []
    for prefix in ("", "/v1"):
        routes += [
            Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/embeddings", embeddings, methods=["POST"]),
        ]
    routes += [
        Route("/_mock/release", release, methods=["POST"]),
        Route("/_mock/requests", seen, methods=["GET"]),
        Route("/_mock/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_Recorder, state=state)])
    app.state.mock = state
    return app


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    state: MockState,
    ident: str,
    model: str,
    message: dict[str, Any],
    usage: dict[str, Any] | None,
) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}  # fmt: skip
    state.open_streams += 1
    state.max_open_streams = max(state.max_open_streams, state.open_streams)
    try:
        opening = {"role": "assistant", "content": ""}
        yield _event({**base, "choices": [{"index": 0, "delta": opening, "finish_reason": None}]})
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            deltas: list[dict[str, Any]] = [{"tool_calls": [{"index": 0, **call}]}]
        else:
            deltas = [{"content": word} for word in _words(message["content"])]
        for number, delta in enumerate(deltas):
            if model == "mock-slow":
                await asyncio.sleep(0.2)
            elif model == "mock-gated":
                await state.gate.acquire()
            if model == "mock-drop" and number == 3:
                raise ConnectionError("mock upstream drops the stream")
            yield _event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        yield _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if usage is not None and model != "mock-no-usage":
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:
        state.open_streams -= 1
