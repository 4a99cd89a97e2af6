"""Legacy Completions (`POST /v1/completions`): validated, reserved from an estimate of `prompt`,
settled from the usage it reports.

A streaming request gets `stream_options.include_usage` spliced in as chat's does, so the final
chunk carries usage; nothing else in the body changes.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.config import Settings
from proxy.errors import InvalidRequest
from proxy.metering import StreamMeter, Usage, text_tokens, usage_from_body
from proxy.surfaces.base import OpenAIErrors, Parsed, expected_object
from proxy.surfaces.chat import with_usage_option
from proxy.validation import (
    MAX_CHOICES,
    check_model,
    check_positive_int,
    check_stream,
    parse_json_object,
)

_PROMPT_TYPES = "a string, an array of strings, an array of tokens or an array of token arrays"
# Completion text is `choices[].text`, for the estimate of a stream that was cut short.
_TEXT_RE = re.compile(rb'"text":\s?"((?:[^"\\]|\\.)*)"')


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def prompts_of(value: object) -> list[str | list[int]] | None:
    """The prompts of a `prompt` (or an embeddings `input`): one string, one token array, or an
    array of either; None for anything else."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return None
    if value and _is_tokens(value):
        return [value]
    if all(isinstance(p, str) or _is_tokens(p) for p in value):
        return value
    return None


def prompt_tokens(prompts: list[str | list[int]]) -> int:
    """Token arrays count their length; text counts as chat's estimate does."""
    tokens = sum(len(p) for p in prompts if isinstance(p, list))
    return tokens + text_tokens(sum(len(p) for p in prompts if isinstance(p, str)))


def _int(body: dict[str, Any], field: str) -> int:
    value = body.get(field)
    return value if isinstance(value, int) else 1


class CompletionsMeter(StreamMeter):
    """Chat's meter, counting `choices[].text` as the streamed text."""

    __slots__ = ()
    text_pattern = _TEXT_RE


class Completions(OpenAIErrors):
    route = "completions"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = check_model(body)
        stream = check_stream(body)
        check_positive_int(body, "max_tokens")
        check_positive_int(body, "n", MAX_CHOICES)
        check_positive_int(body, "best_of", MAX_CHOICES)
        prompts = prompts_of(body.get("prompt", ""))
        if prompts is None:
            raise InvalidRequest(f"prompt must be {_PROMPT_TYPES}", param="prompt")
        suffix = body.get("suffix")
        estimate = prompt_tokens(prompts) + (
            text_tokens(len(suffix)) if isinstance(suffix, str) else 0
        )
        limit = body.get("max_tokens")
        per_choice = limit if isinstance(limit, int) else settings.default_max_tokens
        # Every prompt gets `best_of` completions generated (at least `n`), each billed.
        generated = max(_int(body, "n"), _int(body, "best_of")) * max(1, len(prompts))
        if stream and settings.inject_stream_usage:
            raw = with_usage_option(raw, body)
        return Parsed(
            body=body,
            model=model,
            stream=stream,
            content=raw,
            prompt_estimate=estimate + 3,
            completion_max=per_choice * generated,
            priced=True,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return parsed.stream

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        return usage_from_body(expected_object(payload, parsed, "a text completion"))

    def stream_meter(self) -> StreamMeter:
        return CompletionsMeter()
