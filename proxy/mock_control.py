"""What a test (or an operator) can see and switch on the mock upstream: every request it
received (GET /_mock/requests), a process-wide fault (POST /_mock/fault) and a tag naming the
process in an `x-mock-upstream` header. `proxy/mock_upstream.py` answers the APIs themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class MockState:
    """What the mock has seen, for tests that check what reached the upstream."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.model_list_requests = 0  # Tollgate's own GET /models, kept apart from the above
        self.gate = asyncio.Semaphore(0)
        self.open_streams = 0
        self.max_open_streams = 0
        self.cached_prompts: set[str] = set()  # Anthropic prompt-cache prefixes written
        self.fault: Fault | None = None  # set by POST /_mock/fault


_FAULT_SHAPE = 'a fault is {"status": 400-599} or {"stall": true}, with an optional "count" >= 1'


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """How every generating route fails: with `status`, or by never answering (`stall`), for
    the next `count` requests (None: until cleared)."""

    status: int | None = None
    stall: bool = False
    count: int | None = None

    @classmethod
    def from_json(cls, raw: object) -> Fault | None:
        """The fault a POST /_mock/fault body asks for (None: heal); ValueError when malformed."""
        if not isinstance(raw, dict) or set(raw) - {"status", "stall", "count"}:
            raise ValueError(_FAULT_SHAPE)
        status, stall, count = raw.get("status"), raw.get("stall", False), raw.get("count")
        fails = stall is True or status is not None
        if not (
            (status is None or (type(status) is int and 400 <= status <= 599))
            and type(stall) is bool
            and not (stall and status is not None)
            and (count is None or (type(count) is int and count >= 1 and fails))
        ):
            raise ValueError(_FAULT_SHAPE)
        return cls(status=status, stall=stall, count=count) if fails else None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "stall": self.stall, "count": self.count}


class Recorder:
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
                "body_sha256": hashlib.sha256(raw).hexdigest(),  # the exact bytes received
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


class Tag:
    """Names this mock process in an `x-mock-upstream` header on every answer, so a test with
    several mocks sees which one answered."""

    def __init__(self, app: ASGIApp, *, tag: str) -> None:
        self.app = app
        self.header = (b"x-mock-upstream", tag.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


_Handler = Callable[[Request], Awaitable[Response]]


def faultable(state: MockState, handler: _Handler, anthropic: bool = False) -> _Handler:
    """`handler`, failing as the process's fault says while one is set."""

    async def endpoint(request: Request) -> Response:
        fault = state.fault
        if fault is None:
            return await handler(request)
        if fault.count is not None:
            state.fault = replace(fault, count=fault.count - 1) if fault.count > 1 else None
        if fault.status is None:  # a stall: the caller's timeout ends it
            await asyncio.sleep(3600)
            return Response(status_code=504)
        kind = {429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}.get(
            fault.status, "invalid_request_error" if fault.status < 500 else "api_error"
        )
        if not anthropic and fault.status >= 500:
            kind = "server_error"
        message = f"mock upstream fault: status {fault.status}"
        error = {"type": kind, "message": message}
        answer = error_response(error if anthropic else {**error, "param": None, "code": None},
                        fault.status, anthropic)  # fmt: skip
        if fault.status == 429:
            answer.headers["retry-after"] = "1"
        return answer

    return endpoint


def error_response(error: dict[str, Any], status: int, anthropic: bool) -> Response:
    """An error answer in the dialect's shape (Anthropic's `{"type": "error", ...}`)."""
    return JSONResponse(
        {"type": "error", "error": error} if anthropic else {"error": error}, status
    )
