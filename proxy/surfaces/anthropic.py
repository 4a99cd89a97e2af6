"""Anthropic Messages (`POST /v1/messages`, and its `count_tokens`): validated, reserved from an
estimate of `system`, `messages` and tools up to `max_tokens`, settled from the usage the answer
(or its `message_start` and last `message_delta` events) reports; errors in Anthropic's shape.

The body goes upstream unchanged: an Anthropic stream always carries its usage.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.config import Settings
from proxy.errors import InvalidRequest, ProxyError
from proxy.metering import (
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    StreamMeter,
    Usage,
    event_data,
    text_tokens,
)
from proxy.surfaces.base import Parsed, expected_object
from proxy.validation import (
    MAX_TOKENS,
    check_model,
    check_stream,
    parse_json_object,
)

# Anthropic's error type for each status Tollgate answers (any other 4xx: invalid_request_error,
# 5xx: api_error). 402 is `billing_error`, Anthropic's own type for a balance that cannot pay.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Blocks that stand for an image or a file rather than text: counted as one image each.
_MEDIA_BLOCKS = frozenset({"image", "document"})
# Input tokens in all their parts: Anthropic's `input_tokens` leaves out those the prompt cache
# wrote or read, which are billed as input too.
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")
# The events that carry usage, as their `event:` line or their data's `type` names them
# (unescaped quotes: text inside a delta cannot look like this).
_USAGE_EVENT_RE = re.compile(rb'(?:^event:\s?|"type":\s?")message_(?:start|delta)\b', re.MULTILINE)
# Streamed output: text, tool-input JSON and thinking deltas, for a stream cut short.
_DELTA_RE = re.compile(rb'"(?:text|partial_json|thinking)":\s?"((?:[^"\\]|\\.)*)"')


class AnthropicErrors:
    """An Anthropic-dialect surface: served by `anthropic` upstreams, errors as
    `{"type": "error", "error": {type, message}}` and, ending a stream, an `event: error`."""

    dialect = "anthropic"

    def error_body(self, error: ProxyError) -> bytes:
        status = error.status_code
        kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
        return json.dumps(body, separators=(",", ":")).encode()

    def error_event(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + self.error_body(error) + b"\n\n"


def _content_chars_and_media(content: object) -> tuple[int, int]:
    """Characters of text and media blocks in a message's (or a tool result's) content."""
    if isinstance(content, str):
        return len(content), 0
    chars = media = 0
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in _MEDIA_BLOCKS:
            media += 1
        elif kind == "text" and isinstance(block.get("text"), str):
            chars += len(block["text"])
        elif kind == "tool_result":
            # Its own content may hold images (a screenshot): counted as images, not as base64.
            inner_chars, inner_media = _content_chars_and_media(block.get("content"))
            rest = {k: v for k, v in block.items() if k != "content"}
            chars += inner_chars + len(json.dumps(rest))
            media += inner_media
        else:  # tool_use, thinking, server tool blocks, …: all of it may reach the model
            chars += len(json.dumps(block))
    return chars, media


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """A generous estimate of `system` + `messages` + tools, as chat's estimate is made."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    chars, media = _content_chars_and_media(body.get("system"))
    framing = len(messages) + (1 if "system" in body else 0)
    for message in messages:
        if isinstance(message, dict):
            message_chars, message_media = _content_chars_and_media(message.get("content"))
            chars += message_chars
            media += message_media
    tools = body.get("tools")
    if tools is not None:
        chars += len(json.dumps(tools))
    return text_tokens(chars) + framing * TOKENS_PER_MESSAGE + media * TOKENS_PER_IMAGE + 3


def _check_prompt(body: dict[str, Any]) -> None:
    """`messages` a non-empty array; `system`, when present, a string or text blocks."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array of messages", param="messages")
    system = body.get("system")
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list) or not all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        raise InvalidRequest("system must be a string or an array of text blocks", param="system")


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _usage_fields(raw: object) -> dict[str, int]:
    """The token counts of an Anthropic `usage` object that are well-formed counts."""
    if not isinstance(raw, dict):
        return {}
    fields = ("input_tokens", "output_tokens", *_CACHE_FIELDS)
    return {f: n for f in fields if (n := _count(raw.get(f))) is not None}


def _usage(fields: dict[str, int], completion: int | None, source: str) -> Usage | None:
    """Tollgate's Usage: every input token (uncached, cache writes, cache reads) is a prompt
    token; `details` keeps the cache parts so a price table can price them apart."""
    if "input_tokens" not in fields or completion is None:
        return None
    details = {f: fields[f] for f in _CACHE_FIELDS if f in fields}
    prompt = fields["input_tokens"] + sum(details.values())
    return Usage(prompt, completion, source, details or None)


def usage_from_message(raw: object) -> Usage | None:
    """Usage in a Messages API `usage` object; None when it is missing or malformed."""
    fields = _usage_fields(raw)
    return _usage(fields, fields.get("output_tokens"), "upstream")


class MessagesMeter(StreamMeter):
    """Finds usage in `message_start` (input and cache tokens) and the last `message_delta`
    (output tokens, cumulative); parses no other event.

    Until a `message_delta` comes, its usage is the one `message_start` reported with the output
    estimated from the text streamed so far, so a stream cut short is billed its real input."""

    __slots__ = ("_ended", "_started")
    text_pattern = _DELTA_RE

    def __init__(self) -> None:
        super().__init__()
        self._started: dict[str, int] | None = None

    @property
    def usage(self) -> Usage | None:
        if self._ended is not None or self._started is None:
            return self._ended
        return _usage(self._started, self.completion_estimate(), "estimated")

    @usage.setter
    def usage(self, value: Usage | None) -> None:
        self._ended = value

    def _find_usage(self, event: bytes) -> None:
        # A plain byte search first: the pattern alone would be tried at every byte of every
        # delta event (an anchored alternative defeats the engine's literal prefix scan).
        if b"message_start" not in event and b"message_delta" not in event:
            return
        if _USAGE_EVENT_RE.search(event) is None:
            return
        data = event_data(event)
        if data is None:
            return
        if data.get("type") == "message_start":
            message = data.get("message")
            self._started = _usage_fields(message.get("usage") if isinstance(message, dict) else {})
        elif data.get("type") == "message_delta":
            # Its counts are cumulative; input counts, when present, supersede message_start's.
            delta = _usage_fields(data.get("usage"))
            found = _usage(
                {**(self._started or {}), **delta}, delta.get("output_tokens"), "upstream"
            )
            if found is not None:
                self._ended = found


class Messages(AnthropicErrors):
    route = "messages"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = check_model(body)
        limit = body.get("max_tokens")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_TOKENS:
            raise InvalidRequest(
                f"max_tokens is required: a positive integer of at most {MAX_TOKENS}",
                param="max_tokens",
            )
        _check_prompt(body)
        return Parsed(
            body=body,
            model=model,
            stream=check_stream(body),
            content=raw,
            prompt_estimate=estimate_input_tokens(body),
            completion_max=limit,
            priced=True,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return parsed.stream

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        return usage_from_message(expected_object(payload, parsed, "a message").get("usage"))

    def stream_meter(self) -> StreamMeter:
        return MessagesMeter()


class TokenCount(AnthropicErrors):
    """`POST /v1/messages/count_tokens`: free upstream, so admitted with nothing to reserve or
    charge (the key, its models and its request limits still apply) and recorded with 0 tokens."""

    route = "messages_count_tokens"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = check_model(body)
        _check_prompt(body)
        return Parsed(
            body=body,
            model=model,
            stream=False,
            content=raw,
            prompt_estimate=0,
            completion_max=0,
            priced=False,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return False

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        expected_object(payload, parsed, "a token count")
        return Usage(0, 0, "upstream")

    def stream_meter(self) -> StreamMeter:
        return StreamMeter()
