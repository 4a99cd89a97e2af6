"""Metering: token estimates before a request, usage from responses and stream chunks after.

Stream chunks are not parsed as JSON except the one event that carries a `usage` object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

# About four characters of English text per token; plus per-message framing tokens.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_IMAGE = 765

_MAX_PENDING = 1 << 20
# One encoder for the hot path's records: json.dumps builds a new one per call when given options.
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_TEXT_RE = re.compile(rb'"(?:content|arguments|reasoning_content|refusal)":\s?"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    source: str  # "upstream" or "estimated"
    details: dict[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def text_tokens(chars: int) -> int:
    """Tokens in `chars` characters of text, rounded up (CHARS_PER_TOKEN, no tokenizer)."""
    return -(-chars // CHARS_PER_TOKEN)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A deliberately generous estimate from messages (and tools), without a tokenizer."""
    chars = 0
    images = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    chars += len(part["text"])
                elif part.get("type") in ("image_url", "video_url", "input_audio"):
                    images += 1
        if message.get("tool_calls") is not None:
            chars += len(json.dumps(message["tool_calls"]))
    tools = body.get("tools")
    if tools is not None:
        chars += len(json.dumps(tools))
    count = len(messages) if isinstance(messages, list) else 0
    return text_tokens(chars) + count * TOKENS_PER_MESSAGE + images * TOKENS_PER_IMAGE + 3


def max_completion_tokens(body: dict[str, Any], default: int) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            choices = body.get("n")
            n = choices if isinstance(choices, int) and choices > 1 else 1
            return value * n
    return default


def usage_from_object(raw: object) -> Usage | None:
    """Narrow an upstream `usage` object; None when it is missing or malformed."""
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens", raw.get("input_tokens"))
    completion = raw.get("completion_tokens", raw.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if prompt < 0 or completion < 0 or isinstance(prompt, bool) or isinstance(completion, bool):
        return None
    details = {k: v for k, v in raw.items() if k.endswith("_details") and isinstance(v, dict)}
    return Usage(prompt, completion, "upstream", details or None)


def usage_from_body(body: dict[str, Any]) -> Usage | None:
    return usage_from_object(body.get("usage"))


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object an SSE event's `data:` carries (after any `event:` line), or None."""
    payload = event.partition(b"data:")[2].strip()
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


class StreamMeter:
    """Watches SSE bytes as they pass: finds the usage event and counts streamed text.

    Events are re-assembled across reads only as far as needed to split on blank lines;
    only an event with a `usage` object is parsed. This is Chat Completions' meter; another
    API's meter names its own streamed text (`text_pattern`) and usage event (`_find_usage`).
    """

    __slots__ = ("_pending", "events", "text_chars", "usage")
    # The JSON strings whose characters are generated text, for the estimate of a cut stream.
    text_pattern: ClassVar[re.Pattern[bytes]] = _TEXT_RE

    def __init__(self) -> None:
        self._pending = b""
        self.text_chars = 0
        self.usage: Usage | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk if self._pending else chunk
        if b"\n\n" not in data and b"\r\n\r\n" not in data:
            # An upstream that never ends an event must not grow this buffer without bound.
            self._pending = data if len(data) <= _MAX_PENDING else b""
            return
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        *events, self._pending = data.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        self.events += 1
        for match in self.text_pattern.finditer(event):
            self.text_chars += len(match.group(1))
        self._find_usage(event)

    def _find_usage(self, event: bytes) -> None:
        """Chat's usage: a top-level `usage` object, in the final chunk."""
        if any(marker in event for marker in _USAGE_MARKERS):
            parsed = event_data(event)
            if parsed is not None:
                found = usage_from_object(parsed.get("usage"))
                if found is not None:
                    self.usage = found

    def completion_estimate(self) -> int:
        return text_tokens(self.text_chars)
