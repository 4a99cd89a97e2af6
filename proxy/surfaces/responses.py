"""OpenAI Responses (`POST /v1/responses`): validated, reserved from an estimate of `input`,
`instructions` and tools, settled from the usage the answer (or its final stream event) reports.

The Responses API has no `stream_options`: its `response.completed` (or `.incomplete`/`.failed`)
event always carries the whole response with its usage, so the body goes upstream unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.config import Settings
from proxy.errors import InvalidRequest
from proxy.metering import (
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    StreamMeter,
    Usage,
    event_data,
    text_tokens,
    usage_from_body,
    usage_from_object,
)
from proxy.surfaces.base import OpenAIErrors, Parsed, expected_object
from proxy.validation import (
    check_model,
    check_positive_int,
    check_stream,
    parse_json_object,
)

# Parts that stand for an image or a file rather than text: counted as one image each.
_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})
_FINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")
_FINAL_MARKERS = tuple(t.encode() for t in _FINAL_TYPES)
# A final event's type, as its `event:` line or its data's `type` names it (unescaped quotes:
# text inside a delta cannot look like this).
_FINAL_RE = re.compile(
    rb'(?:^event:\s?|"type":\s?")response\.(?:completed|incomplete|failed)\b', re.MULTILINE
)
# Streamed output: `response.output_text.delta` text, and alike the deltas of tool-call
# arguments and reasoning summaries.
_DELTA_RE = re.compile(rb'"delta":\s?"((?:[^"\\]|\\.)*)"')


def _item_chars_and_media(item: object) -> tuple[int, int]:
    """Characters of text and media parts in one `input` item."""
    if isinstance(item, str):
        return len(item), 0
    if not isinstance(item, dict):
        return 0, 0
    content = item.get("content")
    if "role" not in item and item.get("type", "message") != "message":
        # function_call, function_call_output, reasoning, …: all of it may reach the model.
        return len(json.dumps(item)), 0
    if isinstance(content, str):
        return len(content), 0
    chars = media = 0
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            chars += len(part["text"])
        elif part.get("type") in _MEDIA_PARTS:
            media += 1
    return chars, media


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """A generous estimate of `input` + `instructions` + tools, as chat's estimate is made."""
    source = body.get("input")
    items = source if isinstance(source, list) else [source]
    chars = media = 0
    for item in items:
        item_chars, item_media = _item_chars_and_media(item)
        chars += item_chars
        media += item_media
    framing = len(items)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        chars += len(instructions)
        framing += 1
    tools = body.get("tools")
    if tools is not None:
        chars += len(json.dumps(tools))
    return text_tokens(chars) + framing * TOKENS_PER_MESSAGE + media * TOKENS_PER_IMAGE + 3


class ResponsesMeter(StreamMeter):
    """Finds usage in the final `response.*` event's `response.usage`; parses no other event.

    Counts the text of delta events for the estimate of a stream that was cut short."""

    __slots__ = ()
    text_pattern = _DELTA_RE

    def _find_usage(self, event: bytes) -> None:
        # A plain byte search first: the pattern alone would be tried at every byte of every
        # delta event (an anchored alternative defeats the engine's literal prefix scan).
        if not any(final in event for final in _FINAL_MARKERS):
            return
        if _FINAL_RE.search(event) is None:
            return
        data = event_data(event)
        if data is None or data.get("type") not in _FINAL_TYPES:
            return
        response = data.get("response")
        found = usage_from_object(response.get("usage")) if isinstance(response, dict) else None
        if found is not None:
            self.usage = found


class Responses(OpenAIErrors):
    route = "responses"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = check_model(body)
        stream = check_stream(body)
        check_positive_int(body, "max_output_tokens")
        if not isinstance(body.get("input"), str | list):
            raise InvalidRequest("input must be a string or an array of input items", param="input")
        limit = body.get("max_output_tokens")
        return Parsed(
            body=body,
            model=model,
            stream=stream,
            content=raw,
            prompt_estimate=estimate_input_tokens(body),
            completion_max=limit if isinstance(limit, int) else settings.default_max_tokens,
            priced=True,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return parsed.stream

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        return usage_from_body(expected_object(payload, parsed, "a response object"))

    def stream_meter(self) -> StreamMeter:
        return ResponsesMeter()
