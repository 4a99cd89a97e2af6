"""The legacy Completions surface: its checks, its estimate of `prompt` and of what may be
generated, the usage option a stream asks for, and its usage, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.config import Settings
from proxy.errors import InvalidRequest, UpstreamFailed
from proxy.surfaces.completions import Completions, CompletionsMeter

SETTINGS = Settings(default_max_tokens=100)
BODY: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": "x" * 40}


def parse(body: dict[str, Any], settings: Settings = SETTINGS) -> Any:
    return Completions().parse(json.dumps(body).encode(), settings)


def test_parse_reserves_the_prompt_estimate_and_the_default_completion() -> None:
    parsed = parse(BODY)
    assert (parsed.model, parsed.stream, parsed.priced) == ("gpt-3.5-turbo-instruct", False, True)
    assert parsed.prompt_estimate == 10 + 3
    assert parsed.completion_max == 100
    assert parsed.content == json.dumps(BODY).encode()


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("x" * 41, 11),
        (["x" * 20, "y" * 20], 10),
        ([1, 2, 3, 4, 5], 5),
        ([[1, 2, 3], [4, 5]], 5),
        ([], 0),
    ],
)
def test_prompt_text_is_estimated_and_token_arrays_count_their_length(
    prompt: Any, tokens: int
) -> None:
    assert parse({**BODY, "prompt": prompt}).prompt_estimate == tokens + 3


def test_completion_max_counts_every_generated_completion_of_every_prompt() -> None:
    assert parse({**BODY, "max_tokens": 10}).completion_max == 10
    assert parse({**BODY, "max_tokens": 10, "n": 3}).completion_max == 30
    # best_of completions are generated (and billed) server-side; n of them come back.
    assert parse({**BODY, "max_tokens": 10, "n": 2, "best_of": 5}).completion_max == 50
    assert parse({**BODY, "best_of": 2}).completion_max == 200
    assert parse({**BODY, "max_tokens": 10, "n": 2, "prompt": ["a", "b", "c"]}).completion_max == 60


def test_stream_asks_upstream_for_its_usage_chunk_as_chat_does() -> None:
    streamed = parse({**BODY, "stream": True})
    assert streamed.stream and streamed.content is not None
    assert json.loads(streamed.content)["stream_options"] == {"include_usage": True}
    kept = parse({**BODY, "stream": True, "stream_options": {"include_usage": False}})
    assert kept.content is not None
    assert json.loads(kept.content)["stream_options"] == {"include_usage": True}
    raw = json.dumps({**BODY, "stream": True}).encode()
    assert Completions().parse(raw, Settings(inject_stream_usage=False)).content == raw


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi"}, "model"),
        ({**BODY, "model": "m" * 257}, "model"),
        ({**BODY, "stream": 1}, "stream"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "max_tokens": 1.5}, "max_tokens"),
        ({**BODY, "n": 0}, "n"),
        ({**BODY, "n": 129}, "n"),
        ({**BODY, "best_of": -1}, "best_of"),
        ({**BODY, "prompt": 42}, "prompt"),
        ({**BODY, "prompt": ["a", {"text": "b"}]}, "prompt"),
        ({**BODY, "prompt": [[1, "2"]]}, "prompt"),
    ],
)
def test_parse_refuses_what_tollgate_relies_on_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(body)
    assert refused.value.param == param


def test_json_usage_and_answers_that_are_not_a_completion() -> None:
    completions = Completions()
    parsed = parse(BODY)
    payload = (
        b'{"object": "text_completion", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    )
    usage = completions.usage_from_json(payload, parsed)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
    for bad in (b"<html>", b"[1]"):
        with pytest.raises(UpstreamFailed):
            completions.usage_from_json(bad, parsed)
    streamed = parse({**BODY, "stream": True})
    assert completions.accepts_stream(streamed) and not completions.accepts_stream(parsed)
    with pytest.raises(UpstreamFailed):
        completions.usage_from_json(payload, streamed)


def test_meter_reads_the_usage_chunk_and_counts_choice_text_of_a_cut_stream() -> None:
    def chunk(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    words = [chunk({"object": "text_completion", "choices": [{"text": "x" * 21, "index": 0}]})] * 2
    cut = Completions().stream_meter()
    assert isinstance(cut, CompletionsMeter)
    for part in words:
        cut.feed(part)
    assert cut.usage is None
    assert cut.completion_estimate() == 11
    whole = Completions().stream_meter()
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    for part in [*words, chunk({"choices": [], "usage": usage}), b"data: [DONE]\n\n"]:
        whole.feed(part)
    assert whole.usage is not None and whole.usage.total_tokens == 14
