"""The Embeddings surface: its checks, its estimate of `input` (no output is reserved) and its
usage, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.config import Settings
from proxy.errors import InvalidRequest, UpstreamFailed
from proxy.surfaces.embeddings import Embeddings

SETTINGS = Settings(default_max_tokens=100)
MODEL = "text-embedding-3-small"


def parse(body: dict[str, Any]) -> Any:
    return Embeddings().parse(json.dumps(body).encode(), SETTINGS)


@pytest.mark.parametrize(
    ("source", "tokens"),
    [
        ("x" * 41, 11),
        (["x" * 20, "y" * 21], 11),
        ([1, 2, 3], 3),
        ([[1, 2, 3], [4, 5, 6, 7]], 7),
    ],
)
def test_parse_reserves_the_input_estimate_and_no_output(source: Any, tokens: int) -> None:
    parsed = parse({"model": MODEL, "input": source})
    assert (parsed.model, parsed.stream, parsed.priced) == (MODEL, False, True)
    assert (parsed.prompt_estimate, parsed.completion_max) == (tokens, 0)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m" * 257, "input": "x"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 7}, "input"),
        ({"model": MODEL, "input": [{"text": "x"}]}, "input"),
        ({"model": MODEL, "input": [[1.5]]}, "input"),
    ],
)
def test_parse_refuses_what_tollgate_relies_on_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(body)
    assert refused.value.param == param


def test_usage_is_the_prompt_tokens_and_a_stream_is_never_accepted() -> None:
    embeddings = Embeddings()
    parsed = parse({"model": MODEL, "input": "x", "stream": True})
    assert not parsed.stream and not embeddings.accepts_stream(parsed)
    usage = embeddings.usage_from_json(
        b'{"usage": {"prompt_tokens": 8, "total_tokens": 8}}', parsed
    )
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (8, 0)
    with pytest.raises(UpstreamFailed):
        embeddings.usage_from_json(b"<html>", parsed)
