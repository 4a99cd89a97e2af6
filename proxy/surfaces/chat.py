"""Chat Completions: validated, reserved from an estimate, settled from the usage it reports.

A streaming request gets `stream_options.include_usage` spliced in, so the final chunk carries
usage; nothing else in the body changes.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.config import Settings
from proxy.metering import (
    StreamMeter,
    Usage,
    estimate_prompt_tokens,
    max_completion_tokens,
    usage_from_body,
)
from proxy.surfaces.base import OpenAIErrors, Parsed, expected_object
from proxy.validation import parse_json_object, validate_chat

_USAGE_OPTION = b'"stream_options":{"include_usage":true},'


def with_usage_option(raw: bytes, body: dict[str, Any]) -> bytes:
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


class ChatCompletions(OpenAIErrors):
    route = "chat_completions"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = validate_chat(body)
        stream = body.get("stream") is True
        if stream and settings.inject_stream_usage:
            raw = with_usage_option(raw, body)
        return Parsed(
            body=body,
            model=model,
            stream=stream,
            content=raw,
            prompt_estimate=estimate_prompt_tokens(body),
            completion_max=max_completion_tokens(body, settings.default_max_tokens),
            priced=True,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return parsed.stream

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        return usage_from_body(expected_object(payload, parsed, "a chat completion"))

    def stream_meter(self) -> StreamMeter:
        return StreamMeter()
