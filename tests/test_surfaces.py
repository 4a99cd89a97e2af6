"""The surface seam: each API's parse, usage extraction and error shape, without a server."""

from __future__ import annotations

import json

import pytest

from proxy.config import Settings
from proxy.errors import InvalidRequest, RateLimited, UpstreamFailed
from proxy.surfaces.base import Surface
from proxy.surfaces.chat import ChatCompletions
from proxy.surfaces.completions import Completions
from proxy.surfaces.embeddings import Embeddings
from proxy.surfaces.passthrough import Passthrough
from proxy.surfaces.responses import Responses

SETTINGS = Settings(default_max_tokens=100)
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}]}


def test_chat_parse_reserves_the_estimate_and_asks_a_stream_for_its_usage() -> None:
    chat = ChatCompletions()
    plain = chat.parse(json.dumps(CHAT_BODY).encode(), SETTINGS)
    assert (plain.model, plain.stream, plain.priced) == ("gpt-4o-mini", False, True)
    assert plain.completion_max == 100
    assert plain.prompt_estimate >= 10
    assert plain.content == json.dumps(CHAT_BODY).encode()
    body = {**CHAT_BODY, "stream": True, "n": 2, "max_tokens": 60}
    streamed = chat.parse(json.dumps(body).encode(), SETTINGS)
    assert streamed.content is not None
    assert json.loads(streamed.content)["stream_options"] == {"include_usage": True}
    assert streamed.completion_max == 120
    untouched = Settings(inject_stream_usage=False)
    raw = json.dumps({**CHAT_BODY, "stream": True}).encode()
    assert chat.parse(raw, untouched).content == raw


def test_chat_parse_refuses_what_validation_refuses() -> None:
    with pytest.raises(InvalidRequest) as refused:
        ChatCompletions().parse(json.dumps({**CHAT_BODY, "model": "m" * 257}).encode(), SETTINGS)
    assert refused.value.param == "model"


def test_chat_accepts_only_a_json_completion_for_a_json_request() -> None:
    chat = ChatCompletions()
    plain = chat.parse(json.dumps(CHAT_BODY).encode(), SETTINGS)
    usage = chat.usage_from_json(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}', plain)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
    for payload in (b"<html>", b"[1]"):
        with pytest.raises(UpstreamFailed):
            chat.usage_from_json(payload, plain)
    streamed = chat.parse(json.dumps({**CHAT_BODY, "stream": True}).encode(), SETTINGS)
    assert chat.accepts_stream(streamed) and not chat.accepts_stream(plain)
    with pytest.raises(UpstreamFailed):
        chat.usage_from_json(b'{"usage": {"prompt_tokens": 3}}', streamed)


def test_passthrough_reserves_nothing_and_reads_usage_only_when_reported() -> None:
    passthrough = Passthrough()
    parsed = passthrough.parse(b'{"model": "text-embedding-3-small", "input": "x"}', SETTINGS)
    assert (parsed.model, parsed.prompt_estimate, parsed.completion_max, parsed.priced) == (
        "text-embedding-3-small", 0, 0, False,
    )  # fmt: skip
    assert passthrough.parse(b"", SETTINGS).content is None
    assert passthrough.parse(b"\xff", SETTINGS).model == "-"
    assert passthrough.usage_from_json(b"<html>", parsed) is None
    usage = passthrough.usage_from_json(b'{"usage": {"prompt_tokens": 7}}', parsed)
    assert usage is not None and usage.prompt_tokens == 7
    with pytest.raises(InvalidRequest):
        passthrough.parse(json.dumps({"model": "m" * 257}).encode(), SETTINGS)


@pytest.mark.parametrize(
    "surface", [ChatCompletions(), Responses(), Completions(), Embeddings(), Passthrough()]
)
def test_errors_take_the_openai_shape(surface: Surface) -> None:
    error = RateLimited("slow down")
    assert json.loads(surface.error_body(error))["error"]["type"] == "rate_limit_error"
    event = surface.error_event(error)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "slow down"
