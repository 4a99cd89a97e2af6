"""The surface interface: one API's request checks, token estimates and usage extraction.

A surface turns a client body into a `Parsed` request (what to reserve, what to send) and finds
the usage in the upstream's answer, JSON or SSE. Adding an API is a new module beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import Settings
from proxy.errors import ProxyError, UpstreamFailed
from proxy.metering import StreamMeter, Usage
from proxy.validation import json_object_or_none


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated request: what admission reserves and what goes upstream."""

    model: str
    stream: bool
    content: bytes | None  # the body sent upstream
    prompt_estimate: int  # tokens, for the tokens bucket and the worst-case cost
    completion_max: int  # tokens the answer may take
    priced: bool  # reserve the worst-case cost (False: charge only what usage reports)
    # The client's body as parsed (before any change to `content`): routing reads `provider`.
    body: dict[str, Any] | None = None


class Surface(Protocol):
    """One API surface; `route` labels its metrics, `dialect` picks its upstreams."""

    route: str
    dialect: str  # "openai" | "anthropic": the API an upstream must speak to serve it

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        """Validate the body (400 naming the field) and estimate what the request may use."""
        ...

    def accepts_stream(self, parsed: Parsed) -> bool:
        """Whether an SSE answer is the expected answer to this request."""
        ...

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        """Usage in a 2xx JSON answer; raises UpstreamFailed(reason="invalid") for an answer
        this surface cannot accept."""
        ...

    def stream_meter(self) -> StreamMeter:
        """A meter that finds usage in this surface's SSE events as they pass."""
        ...

    def error_body(self, error: ProxyError) -> bytes:
        """An error answer in this API's shape (before any byte of the answer went out)."""
        ...

    def error_event(self, error: ProxyError) -> bytes:
        """The one SSE event that ends a stream of this API which failed midway."""
        ...


def expected_object(payload: bytes, parsed: Parsed, what: str) -> dict[str, Any]:
    """A 2xx JSON answer to a request that did not ask for a stream: the object, or a 502
    (`invalid`) when it is not one."""
    body = json_object_or_none(payload)
    if body is None or parsed.stream:
        raise UpstreamFailed(f"Upstream answered with a body that is not {what}", reason="invalid")
    return body


class OpenAIErrors:
    """An OpenAI-dialect surface: served by `openai` upstreams, with OpenAI's error shape
    `{"error": {message, type, param, code}}` and, as the last SSE event, `data: {"error": ...}`
    (which the OpenAI SDKs raise)."""

    dialect = "openai"

    def error_body(self, error: ProxyError) -> bytes:
        return error.json_bytes()

    def error_event(self, error: ProxyError) -> bytes:
        return error.sse_event()
