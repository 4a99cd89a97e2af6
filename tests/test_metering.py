"""Metering (SSE usage and text, prompt estimates, upstream usage objects) and the
reset-duration format of the rate-limit headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy import metering
from proxy.limits import format_duration
from proxy.metering import (
    StreamMeter,
    Usage,
    estimate_prompt_tokens,
    max_completion_tokens,
    usage_from_body,
    usage_from_object,
)


def event(payload: dict[str, Any], *, separators: tuple[str, str] = (",", ":")) -> bytes:
    return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"


def chunk(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


USAGE = {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26}
STREAM = (
    event(chunk(""))
    + event(chunk("Hello"))
    + event(chunk(" world"))
    + event({"id": "chatcmpl-1", "choices": [], "usage": USAGE})
    + b"data: [DONE]\n\n"
)


class CountingJson:
    """Stands in for the json module inside proxy.metering, counting parses."""

    def __init__(self) -> None:
        self.parsed: list[bytes] = []

    def loads(self, payload: bytes) -> Any:
        self.parsed.append(payload)
        return json.loads(payload)

    def dumps(self, value: Any) -> str:
        return json.dumps(value)


# --- StreamMeter -------------------------------------------------------------------------------


def test_stream_meter_finds_usage_in_a_whole_stream() -> None:
    meter = StreamMeter()
    meter.feed(STREAM)
    assert meter.usage == Usage(17, 9, "upstream")
    assert meter.events == 5
    assert meter.text_chars == len("Hello world")


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_stream_meter_finds_usage_split_at_every_byte(cut: int) -> None:
    meter = StreamMeter()
    meter.feed(STREAM[:cut])
    meter.feed(STREAM[cut:])
    assert meter.usage == Usage(17, 9, "upstream")
    assert meter.events == 5
    assert meter.text_chars == len("Hello world")


def test_stream_meter_finds_usage_fed_one_byte_at_a_time() -> None:
    meter = StreamMeter()
    for index in range(len(STREAM)):
        meter.feed(STREAM[index : index + 1])
    assert meter.usage == Usage(17, 9, "upstream")
    assert meter.events == 5
    assert meter.text_chars == len("Hello world")


@pytest.mark.parametrize("cut", range(1, 40))
def test_stream_meter_handles_crlf_events_split_anywhere(cut: int) -> None:
    stream = STREAM.replace(b"\n", b"\r\n")
    meter = StreamMeter()
    meter.feed(stream[:cut])
    meter.feed(stream[cut:])
    assert meter.usage == Usage(17, 9, "upstream")
    assert meter.events == 5


def test_stream_meter_reads_usage_with_spaced_json() -> None:
    """Python-based upstreams (vLLM and others) write `"usage": {` with a space."""
    meter = StreamMeter()
    meter.feed(event({"choices": [], "usage": USAGE}, separators=(", ", ": ")))
    assert meter.usage == Usage(17, 9, "upstream")


def test_stream_meter_keeps_usage_details() -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 4}, "cost": 1}
    meter = StreamMeter()
    meter.feed(event({"choices": [], "usage": usage}))
    assert meter.usage is not None
    assert meter.usage.details == {"prompt_tokens_details": {"cached_tokens": 4}}


def test_stream_meter_parses_only_the_usage_event(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingJson()
    monkeypatch.setattr(metering, "json", counting)
    with_null_usage = {**chunk("Hi"), "usage": None}
    stream = event(chunk("a")) * 50 + event(with_null_usage) * 50 + STREAM
    meter = StreamMeter()
    meter.feed(stream)
    assert meter.events == 105
    assert meter.usage == Usage(17, 9, "upstream")
    assert len(counting.parsed) == 1
    assert b'"usage":{' in counting.parsed[0]


def test_stream_meter_counts_events_without_usage_and_tolerates_junk() -> None:
    meter = StreamMeter()
    meter.feed(b": keep-alive comment\n\n")
    meter.feed(b"data: {not json at all\n\n")
    meter.feed(b"event: ping\ndata: {}\n\n")
    meter.feed(b'data: {"usage":{"prompt_tokens":"x"}}\n\n')
    meter.feed(b'data: {"usage":{broken\n\n')
    meter.feed(b"data: [DONE]\n\n")
    assert meter.events == 6
    assert meter.usage is None


def test_stream_meter_keeps_the_last_valid_usage() -> None:
    meter = StreamMeter()
    meter.feed(event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
    meter.feed(event({"choices": [], "usage": USAGE}))
    meter.feed(b'data: {"usage":{"prompt_tokens":-1}}\n\n')
    assert meter.usage == Usage(17, 9, "upstream")


def test_stream_meter_counts_text_for_the_estimate() -> None:
    tool_delta = {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
            }
        ]
    }
    reasoning = {"choices": [{"index": 0, "delta": {"reasoning_content": "Think."}}]}
    meter = StreamMeter()
    meter.feed(event(chunk("abcd")) + event(chunk("efgh")) + event(tool_delta) + event(reasoning))
    escaped_arguments = len(json.dumps('{"city":')) - 2
    assert meter.text_chars == 8 + escaped_arguments + len("Think.")
    assert meter.completion_estimate() == -(-meter.text_chars // 4)
    assert meter.usage is None


def test_stream_meter_text_grows_with_the_reply() -> None:
    short, long = StreamMeter(), StreamMeter()
    short.feed(event(chunk("word ")))
    long.feed(event(chunk("word ")) * 100)
    assert long.completion_estimate() > short.completion_estimate() * 50


def test_stream_meter_without_events_estimates_nothing() -> None:
    meter = StreamMeter()
    meter.feed(b'data: {"choices": [{"delta": {"content": "unterminated')
    assert meter.events == 0
    assert meter.completion_estimate() == 0


def test_stream_meter_drops_an_unterminated_event_over_a_mebibyte() -> None:
    meter = StreamMeter()
    meter.feed(b'data: {"choices":[{"delta":{"content":"' + b"x" * (2 << 20))
    meter.feed(b'"}}]}\n\n' + event(chunk("abcd")) + event({"choices": [], "usage": USAGE}))
    assert meter.text_chars == 4
    assert meter.usage == Usage(17, 9, "upstream")


def test_stream_meter_reassembles_a_large_event_under_a_mebibyte() -> None:
    meter = StreamMeter()
    meter.feed(b'data: {"choices":[{"delta":{"content":"' + b"x" * 500_000)
    meter.feed(b"x" * 500_000 + b'"}}]}\n\n')
    assert meter.text_chars == 1_000_000


# --- prompt estimates --------------------------------------------------------------------------


def body_of(*contents: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content} for content in contents],
        **extra,
    }


def test_estimate_grows_with_content() -> None:
    small = estimate_prompt_tokens(body_of("hi"))
    medium = estimate_prompt_tokens(body_of("hi " * 100))
    large = estimate_prompt_tokens(body_of("hi " * 10_000))
    assert 0 < small < medium < large
    assert large >= 30_000 // 4


def test_estimate_grows_with_messages() -> None:
    one = estimate_prompt_tokens(body_of("hello"))
    three = estimate_prompt_tokens(body_of("hello", "hello", "hello"))
    assert three > one + 2 * (len("hello") // 4)


def test_estimate_counts_images_and_text_parts() -> None:
    text_only = body_of([{"type": "text", "text": "What is this?"}])
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with_one = body_of([{"type": "text", "text": "What is this?"}, image])
    with_two = body_of([{"type": "text", "text": "What is this?"}, image, image])
    base = estimate_prompt_tokens(text_only)
    assert estimate_prompt_tokens(with_one) - base == metering.TOKENS_PER_IMAGE
    assert estimate_prompt_tokens(with_two) - base == 2 * metering.TOKENS_PER_IMAGE
    video = body_of([{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}])
    assert estimate_prompt_tokens(video) >= metering.TOKENS_PER_IMAGE


def test_estimate_counts_tools_and_tool_calls() -> None:
    plain = body_of("weather?")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"x": "y" * 400}}}]
    assert estimate_prompt_tokens({**plain, "tools": tools}) > estimate_prompt_tokens(plain) + 100
    call = {"id": "c", "type": "function", "function": {"name": "w", "arguments": "z" * 400}}
    with_call = {
        **plain,
        "messages": [
            *plain["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
    }
    assert estimate_prompt_tokens(with_call) > estimate_prompt_tokens(plain) + 100


def test_estimate_is_generous_for_english_text() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50
    # Real tokenizers give about 10 tokens per sentence here (500 in all).
    assert estimate_prompt_tokens(body_of(text)) >= 500


def test_estimate_survives_odd_shapes() -> None:
    for body in (
        {},
        {"messages": "x"},
        {"messages": [None, 1, "x", {"content": 5}, {"content": [None, 1, {"type": 3}]}]},
    ):
        assert estimate_prompt_tokens(body) >= 0


def test_max_completion_tokens_prefers_the_new_field_and_counts_choices() -> None:
    assert max_completion_tokens({}, 1024) == 1024
    assert max_completion_tokens({"max_tokens": 50}, 1024) == 50
    assert max_completion_tokens({"max_completion_tokens": 70, "max_tokens": 50}, 1024) == 70
    assert max_completion_tokens({"max_tokens": 50, "n": 3}, 1024) == 150
    assert max_completion_tokens({"max_tokens": True}, 1024) == 1024


# --- usage objects -----------------------------------------------------------------------------


def test_usage_from_object_reads_openai_and_responses_names() -> None:
    assert usage_from_object(USAGE) == Usage(17, 9, "upstream")
    assert usage_from_object({"input_tokens": 5, "output_tokens": 2}) == Usage(5, 2, "upstream")
    assert usage_from_object({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0, "upstream")
    assert usage_from_object({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(
        0, 0, "upstream"
    )
    assert Usage(17, 9, "upstream").total_tokens == 26


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "usage",
        [17, 9],
        {},
        {"completion_tokens": 9},
        {"prompt_tokens": "17", "completion_tokens": 9},
        {"prompt_tokens": 17, "completion_tokens": "9"},
        {"prompt_tokens": 17.0, "completion_tokens": 9},
        {"prompt_tokens": 17, "completion_tokens": 9.5},
        {"prompt_tokens": None, "completion_tokens": 9},
        {"prompt_tokens": 17, "completion_tokens": None},
        {"prompt_tokens": -1, "completion_tokens": 9},
        {"prompt_tokens": 17, "completion_tokens": -9},
        {"prompt_tokens": True, "completion_tokens": 9},
        {"prompt_tokens": 17, "completion_tokens": False},
    ],
)
def test_usage_from_object_rejects_malformed_usage(raw: object) -> None:
    assert usage_from_object(raw) is None


def test_usage_from_body_reads_the_usage_field() -> None:
    assert usage_from_body({"choices": [], "usage": USAGE}) == Usage(17, 9, "upstream")
    assert usage_from_body({"choices": []}) is None
    assert usage_from_body({"usage": None}) is None


# --- reset durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (-5, "0ms"),
        (1, "1ms"),
        (250, "250ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1001, "1.001s"),
        (1500, "1.5s"),
        (2000, "2s"),
        (12_345, "12.345s"),
        (59_999, "59.999s"),
        (30_000, "30s"),
        (60_000, "1m0s"),
        (90_000, "1m30s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_format_duration_uses_openais_format(ms: int, text: str) -> None:
    assert format_duration(ms) == text
