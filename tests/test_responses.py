"""The Responses surface: its checks, its estimate of `input`, and its usage in JSON and in the
final event of a stream, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.config import Settings
from proxy.errors import InvalidRequest, UpstreamFailed
from proxy.metering import CHARS_PER_TOKEN, TOKENS_PER_IMAGE, TOKENS_PER_MESSAGE
from proxy.surfaces.responses import Responses, ResponsesMeter

SETTINGS = Settings(default_max_tokens=100)
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "input": "x" * 400}
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 8},
    "total_tokens": 42,
}


def parse(body: dict[str, Any]) -> Any:
    return Responses().parse(json.dumps(body).encode(), SETTINGS)


def event(kind: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def test_parse_reserves_the_input_estimate_and_the_default_output_and_sends_the_body_as_is() -> (
    None
):
    raw = json.dumps({**BODY, "stream": True}).encode()
    parsed = Responses().parse(raw, SETTINGS)
    assert (parsed.model, parsed.stream, parsed.priced) == ("gpt-4o-mini", True, True)
    assert parsed.content == raw  # no stream_options: the final event always carries usage
    assert parsed.completion_max == 100
    assert parsed.prompt_estimate == 400 // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE + 3
    assert parse({**BODY, "max_output_tokens": 77}).completion_max == 77


def test_estimate_counts_items_parts_images_files_instructions_and_tools() -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    body = {
        "model": "gpt-4o",
        "instructions": "i" * 40,
        "tools": tools,
        "input": [
            {"role": "user", "content": "a" * 80},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "b" * 40},
                    {"type": "input_image", "image_url": "https://example.com/cat.png"},
                    {"type": "input_file", "file_id": "file-abc"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "c" * 40}]},
            {"type": "function_call_output", "call_id": "call_1", "output": "d" * 40},
        ],
    }
    output_item = json.dumps(body["input"][3])
    chars = 40 + len(json.dumps(tools)) + 80 + 40 + 40 + len(output_item)
    expected = -(-chars // CHARS_PER_TOKEN) + 5 * TOKENS_PER_MESSAGE + 2 * TOKENS_PER_IMAGE + 3
    assert parse(body).prompt_estimate == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({**BODY, "model": ""}, "model"),
        ({**BODY, "model": "m" * 257}, "model"),
        ({**BODY, "stream": "yes"}, "stream"),
        ({**BODY, "max_output_tokens": 0}, "max_output_tokens"),
        ({**BODY, "max_output_tokens": "9"}, "max_output_tokens"),
        ({**BODY, "max_output_tokens": True}, "max_output_tokens"),
        ({"model": "gpt-4o-mini"}, "input"),
        ({**BODY, "input": {"role": "user"}}, "input"),
        ({**BODY, "input": None}, "input"),
    ],
)
def test_parse_refuses_what_tollgate_relies_on_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(body)
    assert refused.value.param == param


def test_json_usage_keeps_input_output_and_their_details() -> None:
    responses = Responses()
    parsed = parse(BODY)
    usage = responses.usage_from_json(
        json.dumps({"object": "response", "usage": USAGE}).encode(), parsed
    )
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (12, 30, "upstream")
    assert usage.details == {
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens_details": {"reasoning_tokens": 8},
    }
    for payload in (b"<html>", b"[1]", b'"text"'):
        with pytest.raises(UpstreamFailed):
            responses.usage_from_json(payload, parsed)
    streamed = parse({**BODY, "stream": True})
    assert responses.accepts_stream(streamed) and not responses.accepts_stream(parsed)
    with pytest.raises(UpstreamFailed):
        responses.usage_from_json(b'{"usage": {"input_tokens": 3}}', streamed)


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete", "response.failed"])
def test_meter_reads_usage_from_the_final_event_split_anywhere(final: str) -> None:
    stream = (
        event("response.created", {"response": {"id": "r", "usage": None}})
        + event("response.output_text.delta", {"delta": "Hello "})
        + event("response.output_text.delta", {"delta": "world"})
        + event(final, {"response": {"id": "r", "status": final[9:], "usage": USAGE}})
    )
    for size in (1, 7, len(stream)):
        meter = Responses().stream_meter()
        for start in range(0, len(stream), size):
            meter.feed(stream[start : start + size])
        assert meter.usage is not None
        assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (12, 30)


def test_meter_of_a_cut_stream_counts_delta_text_and_finds_no_usage() -> None:
    meter = ResponsesMeter()
    meter.feed(event("response.created", {"response": {"usage": None}}))
    meter.feed(event("response.output_text.delta", {"delta": "x" * 41}))
    meter.feed(event("response.output_text.delta", {"delta": "y" * 3}))
    assert meter.usage is None
    assert meter.completion_estimate() == 11


def test_meter_ignores_usage_outside_a_final_event() -> None:
    meter = ResponsesMeter()
    # Text that names the final event, and a top-level usage in another event, are not it.
    meter.feed(event("response.output_text.delta", {"delta": '"type":"response.completed"'}))
    meter.feed(event("response.in_progress", {"usage": USAGE, "response": {"usage": USAGE}}))
    meter.feed(b'data: {"type":"response.completed","response":{"usage":"odd"}}\n\n')
    assert meter.usage is None
    # Without an `event:` line (some upstreams send data only) the data's type is enough.
    meter.feed(
        b'data: {"type":"response.completed","response":{"usage":'
        + json.dumps(USAGE).encode()
        + b"}}\n\n"
    )
    assert meter.usage is not None and meter.usage.total_tokens == 42
