"""The built-in mock upstream of `tollgate demo` (and of the tests): an OpenAI-style server.

It answers chat completions (JSON or SSE with a final usage chunk), tool calls, Responses (JSON
or `event:`/`data:` SSE ending with `response.completed`), legacy completions (JSON or SSE with a
usage chunk when asked), embeddings, /models, and Anthropic messages (JSON, or SSE from
`message_start` to `message_stop`; a `system` with a `cache_control` block is written to the
prompt cache the first time and read from it after) and their `count_tokens`. Some model names
ask for misbehaviour, on every generating route, so operators can watch Tollgate handle it:
`mock-slow` (0.2 s between chunks), `mock-hang` (never answers), `mock-error` (500),
`mock-bad-json` (200 that is not JSON), `mock-drop` (stream cut mid-way), `mock-no-usage`
(stream without usage), `mock-gated` (each chunk waits for POST /_mock/release).
GET /_mock/requests shows every request it received, on any path (method, path, raw path,
query, headers, body and its bytes' SHA-256), except its model list, which it only counts;
POST /_mock/reset forgets them. POST /_mock/fault makes the whole process a failing upstream,
for every model, so several mocks can play the upstreams of one model: `{"status": 503}`
answers every generating route with that status and an error in its dialect's shape (a 429
with `retry-after: 1`), `{"stall": true}` never answers, `"count": n` limits either to the
next n generating requests, `{}` heals it; the model list is unaffected and faulted requests
are still recorded. A process started with TOLLGATE_MOCK_TAG (`create_mock_upstream_from_environ`)
names itself in an `x-mock-upstream` header on every answer. That inspection and control lives
in `proxy/mock_control.py`; this module answers the APIs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.mock_control import Fault, MockState, Recorder, Tag, error_response, faultable

__all__ = [
    "MODELS", "REPLY", "Fault", "MockState", "create_mock_upstream",
    "create_mock_upstream_from_environ",
]  # fmt: skip

MODELS = ("gpt-4o-mini", "gpt-4o", "mock-slow", "mock-gated")
REPLY = "Hello from the Tollgate mock upstream! This answer streams word by word."


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


async def _misbehaviour(model: str, *, anthropic: bool = False) -> Response | None:
    """The answer a misbehaving model name asks for, if any (errors in Anthropic's shape for
    its route)."""
    if model == "mock-hang":
        await asyncio.sleep(3600)
    if model == "mock-error":
        kind = "api_error" if anthropic else "server_error"
        return error_response({"message": "boom", "type": kind}, 500, anthropic)
    if model == "mock-bad-json":
        return Response(b"<html>not json</html>", media_type="application/json")
    if model == "mock-not-found" or model.startswith("missing-"):
        message = f"The model `{model}` does not exist"
        if anthropic:
            return error_response({"type": "not_found_error", "message": message}, 404, anthropic)
        error = {"message": message, "type": "invalid_request_error", "param": None,
                 "code": "model_not_found"}  # fmt: skip
        return error_response(error, 404, anthropic)
    return None


def create_mock_upstream_from_environ() -> Starlette:
    """The uvicorn factory of a mock process, tagged with TOLLGATE_MOCK_TAG when it is set."""
    return create_mock_upstream(tag=os.environ.get("TOLLGATE_MOCK_TAG") or None)


def create_mock_upstream(state: MockState | None = None, *, tag: str | None = None) -> Starlette:
    state = state or MockState()

    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body.get("model", "")
        if (odd := await _misbehaviour(model)) is not None:
            return odd
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

    async def responses(request: Request) -> Response:
        body = await request.json()
        model = body.get("model", "")
        if (odd := await _misbehaviour(model)) is not None:
            return odd
        prompt = max(1, len(json.dumps([body.get("input"), body.get("instructions")])) // 4)
        completion = max(1, len(REPLY) // 4)
        usage = {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }  # fmt: skip
        if not body.get("stream"):
            return JSONResponse(_response_object(body, "completed", REPLY, usage))
        return StreamingResponse(
            _response_events(state, body, None if model == "mock-no-usage" else usage),
            media_type="text/event-stream",
        )

    async def completions(request: Request) -> Response:
        body = await request.json()
        model = body.get("model", "")
        if (odd := await _misbehaviour(model)) is not None:
            return odd
        prompt = max(1, len(json.dumps(body.get("prompt", ""))) // 4)
        completion = max(1, len(REPLY) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        base = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion",
                "created": int(time.time()), "model": model}  # fmt: skip
        if not body.get("stream"):
            choice = {"text": REPLY, "index": 0, "logprobs": None, "finish_reason": "stop"}
            return JSONResponse({**base, "choices": [choice], "usage": usage})
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return StreamingResponse(
            _text_completion_chunks(state, base, usage if include_usage else None),
            media_type="text/event-stream",
        )

    async def messages(request: Request) -> Response:
        body = await request.json()
        model = body.get("model", "")
        if (odd := await _misbehaviour(model, anthropic=True)) is not None:
            return odd
        usage = _message_usage(state, body)
        if not body.get("stream"):
            return JSONResponse(_message(model, REPLY, usage))
        return StreamingResponse(
            _message_events(state, model, None if model == "mock-no-usage" else usage),
            media_type="text/event-stream",
        )

    async def count_tokens(request: Request) -> Response:
        body = await request.json()
        tokens = max(1, len(json.dumps([body.get("system"), body.get("messages")])) // 4)
        return JSONResponse({"input_tokens": tokens})

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
            "fault": None if state.fault is None else state.fault.to_json(),
        }
        return Response(json.dumps(answer), media_type="application/json")

    async def reset(request: Request) -> Response:
        state.requests.clear()
        state.max_open_streams = state.open_streams
        return JSONResponse({"reset": True})

    async def fault(request: Request) -> Response:
        try:
            state.fault = Fault.from_json(json.loads(await request.body() or b"{}"))
        except ValueError as exc:  # malformed JSON too
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"fault": None if state.fault is None else state.fault.to_json()})

    routes = []
    for prefix in ("", "/v1"):
        routes += [
            Route(f"{prefix}/chat/completions", faultable(state, chat), methods=["POST"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/embeddings", faultable(state, embeddings), methods=["POST"]),
            Route(f"{prefix}/responses", faultable(state, responses), methods=["POST"]),
            Route(f"{prefix}/completions", faultable(state, completions), methods=["POST"]),
            Route(f"{prefix}/messages", faultable(state, messages, True), methods=["POST"]),
            Route(
                f"{prefix}/messages/count_tokens",
                faultable(state, count_tokens, True),
                methods=["POST"],
            ),
        ]
    routes += [
        Route("/_mock/release", release, methods=["POST"]),
        Route("/_mock/requests", seen, methods=["GET"]),
        Route("/_mock/reset", reset, methods=["POST"]),
        Route("/_mock/fault", fault, methods=["POST"]),
    ]
    middleware = [Middleware(Recorder, state=state)]
    if tag is not None:
        middleware.insert(0, Middleware(Tag, tag=tag))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.mock = state
    return app


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _pace(state: MockState, model: str, number: int) -> None:
    """Before the `number`th generated chunk: the pace (or the failure) the model asks for."""
    if model == "mock-slow":
        await asyncio.sleep(0.2)
    elif model == "mock-gated":
        await state.gate.acquire()
    if model == "mock-drop" and number == 3:
        raise ConnectionError("mock upstream drops the stream")


class _Opened:
    """Counts one open stream for as long as it runs."""

    def __init__(self, state: MockState) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.state.open_streams += 1
        self.state.max_open_streams = max(self.state.max_open_streams, self.state.open_streams)

    def __exit__(self, *exc: object) -> None:
        self.state.open_streams -= 1


def _response_object(
    body: dict[str, Any], status: str, text: str, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A Responses API `response` object holding one assistant message."""
    message = {
        "type": "message", "id": "msg_mock", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }  # fmt: skip
    return {
        "id": "resp_mock", "object": "response", "created_at": int(time.time()),
        "status": status, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "metadata": {}, "model": body.get("model"),
        "output": [message] if text else [], "parallel_tool_calls": True,
        "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "max_output_tokens": body.get("max_output_tokens"), "usage": usage,
    }  # fmt: skip


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    """One Responses event as OpenAI sends it: an `event:` line, then its `data:`."""
    return f"event: {kind}\n".encode() + _event({"type": kind, **payload})


async def _response_events(
    state: MockState, body: dict[str, Any], usage: dict[str, Any] | None
) -> AsyncIterator[bytes]:
    model = body.get("model", "")
    where = {"item_id": "msg_mock", "output_index": 0, "content_index": 0}
    with _Opened(state):
        yield _sse("response.created", {"sequence_number": 0,
                   "response": _response_object(body, "in_progress", "", None)})  # fmt: skip
        for number, word in enumerate(_words(REPLY)):
            await _pace(state, model, number)
            event = {"sequence_number": number + 1, **where, "delta": word, "logprobs": []}
            yield _sse("response.output_text.delta", event)
        last = len(_words(REPLY)) + 1
        done = {"sequence_number": last, **where, "text": REPLY, "logprobs": []}
        yield _sse("response.output_text.done", done)
        final = _response_object(body, "completed", REPLY, usage)
        yield _sse("response.completed", {"sequence_number": last + 1, "response": final})


async def _text_completion_chunks(
    state: MockState, base: dict[str, Any], usage: dict[str, Any] | None
) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _event({**base, "choices": [choice]})

    with _Opened(state):
        for number, word in enumerate(_words(REPLY)):
            await _pace(state, base["model"], number)
            yield chunk(word, None)
        yield chunk("", "stop")
        if usage is not None and base["model"] != "mock-no-usage":
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


async def _stream(
    state: MockState,
    ident: str,
    model: str,
    message: dict[str, Any],
    usage: dict[str, Any] | None,
) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}  # fmt: skip
    with _Opened(state):
        opening = {"role": "assistant", "content": ""}
        yield _event({**base, "choices": [{"index": 0, "delta": opening, "finish_reason": None}]})
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            deltas: list[dict[str, Any]] = [{"tool_calls": [{"index": 0, **call}]}]
        else:
            deltas = [{"content": word} for word in _words(message["content"])]
        for number, delta in enumerate(deltas):
            await _pace(state, model, number)
            yield _event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        yield _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if usage is not None and model != "mock-no-usage":
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _message_usage(state: MockState, body: dict[str, Any]) -> dict[str, int]:
    """Anthropic usage: a `system` holding a `cache_control` block is a cached prefix, written
    the first time it is seen and read after."""
    system = body.get("system")
    usage = {"input_tokens": max(1, len(json.dumps(body.get("messages", []))) // 4),
             "output_tokens": max(1, len(REPLY) // 4),
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}  # fmt: skip
    if isinstance(system, list) and any("cache_control" in b for b in system):
        prefix = json.dumps(system)
        seen = prefix in state.cached_prompts
        usage["cache_read_input_tokens" if seen else "cache_creation_input_tokens"] = (
            len(prefix) // 4
        )
        state.cached_prompts.add(prefix)
    elif system is not None:
        usage["input_tokens"] += len(json.dumps(system)) // 4
    return usage


def _message(model: str, text: str, usage: dict[str, int] | None) -> dict[str, Any]:
    """An Anthropic `message` object holding one text block."""
    return {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}] if text else [],
        "stop_reason": "end_turn" if text else None, "stop_sequence": None, "usage": usage,
    }  # fmt: skip


async def _message_events(
    state: MockState, model: str, usage: dict[str, int] | None
) -> AsyncIterator[bytes]:
    """Anthropic's stream: message_start (input usage), one text block of deltas,
    message_delta (output usage), message_stop."""
    opening = {**usage, "output_tokens": 1} if usage is not None else None
    with _Opened(state):
        yield _sse("message_start", {"message": _message(model, "", opening)})
        block = {"type": "text", "text": ""}
        yield _sse("content_block_start", {"index": 0, "content_block": block})
        yield _sse("ping", {})
        for number, word in enumerate(_words(REPLY)):
            await _pace(state, model, number)
            delta = {"type": "text_delta", "text": word}
            yield _sse("content_block_delta", {"index": 0, "delta": delta})
        yield _sse("content_block_stop", {"index": 0})
        ending: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if usage is not None:
            ending["usage"] = {"output_tokens": usage["output_tokens"]}
        yield _sse("message_delta", ending)
        yield _sse("message_stop", {})
