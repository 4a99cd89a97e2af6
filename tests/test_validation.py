"""SPEC §3 validation through POST /v1/chat/completions: every bad request is a 400 that
names its field and never reaches the upstream; every good one reaches it unchanged."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Harness

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def key(harness: Harness) -> str:
    secret: str = harness.create_key(name="validation")["key"]
    return secret


def post_raw(harness: Harness, key: str, content: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return harness.client.post(CHAT, content=content, headers=headers)


def body_with(**fields: Any) -> dict[str, Any]:
    """A valid request with some fields changed; a value of ... removes the field."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HELLO}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def assert_invalid(harness: Harness, response: httpx.Response, param: str | None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert harness.mock.requests == []
    return error


# --- the body as a whole ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'"just a string"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"true", id="boolean"),
        pytest.param(b'[{"model": "gpt-4o-mini", "messages": []}]', id="array"),
    ],
)
def test_body_not_a_json_object_is_rejected(harness: Harness, key: str, content: bytes) -> None:
    error = assert_invalid(harness, post_raw(harness, key, content), None)
    assert "object" in error["message"]


def test_body_not_utf8_is_rejected(harness: Harness, key: str) -> None:
    content = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    error = assert_invalid(harness, post_raw(harness, key, content), None)
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"model": "gpt-4o-mini",}', id="trailing-comma"),
        pytest.param(b"{'model': 'gpt-4o-mini'}", id="single-quotes"),
        pytest.param(b"model=gpt-4o-mini", id="form"),
    ],
)
def test_body_not_valid_json_is_rejected(harness: Harness, key: str, content: bytes) -> None:
    error = assert_invalid(harness, post_raw(harness, key, content), None)
    assert "JSON" in error["message"]


# --- model and messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(..., id="missing"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param(None, id="null"),
        pytest.param(42, id="number"),
        pytest.param(["gpt-4o-mini"], id="array"),
    ],
)
def test_model_missing_or_not_a_string_is_rejected(harness: Harness, key: str, model: Any) -> None:
    response = harness.chat(key, body_with(model=model))
    error = assert_invalid(harness, response, "model")
    assert error["message"] == "You must specify a model to call"


def test_model_with_a_lone_surrogate_is_rejected(harness: Harness, key: str) -> None:
    content = b'{"model": "gpt\\ud800", "messages": [{"role": "user", "content": "Hi"}]}'
    assert_invalid(harness, post_raw(harness, key, content), "model")


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(..., id="missing"),
        pytest.param(None, id="null"),
        pytest.param("Hello", id="string"),
        pytest.param({"role": "user", "content": "Hello"}, id="object"),
    ],
)
def test_messages_missing_or_not_an_array_is_rejected(
    harness: Harness, key: str, messages: Any
) -> None:
    assert_invalid(harness, harness.chat(key, body_with(messages=messages)), "messages")


def test_messages_empty_is_rejected_with_openais_message(harness: Harness, key: str) -> None:
    error = assert_invalid(harness, harness.chat(key, body_with(messages=[])), "messages")
    assert error["message"] == "Messages array cannot be empty"


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({"content": "Hello"}, id="missing"),
        pytest.param({"role": "wizard", "content": "Hello"}, id="unknown"),
        pytest.param({"role": "User", "content": "Hello"}, id="wrong-case"),
        pytest.param({"role": None, "content": "Hello"}, id="null"),
        pytest.param({"role": 1, "content": "Hello"}, id="number"),
    ],
)
def test_message_without_a_valid_role_is_rejected(
    harness: Harness, key: str, message: dict[str, Any]
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, message]
    response = harness.chat(key, body_with(messages=messages))
    assert_invalid(harness, response, "messages[1].role")


def test_message_that_is_not_an_object_is_rejected(harness: Harness, key: str) -> None:
    response = harness.chat(key, body_with(messages=["Hello"]))
    assert_invalid(harness, response, "messages[0]")


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool", "developer"])
def test_message_without_content_is_rejected(harness: Harness, key: str, role: str) -> None:
    response = harness.chat(key, body_with(messages=[{"role": role}]))
    assert_invalid(harness, response, "messages[0].content")


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool", "developer"])
def test_message_with_null_content_is_rejected(harness: Harness, key: str, role: str) -> None:
    response = harness.chat(key, body_with(messages=[{"role": role, "content": None}]))
    assert_invalid(harness, response, "messages[0].content")


def test_assistant_null_content_with_empty_tool_calls_is_rejected(
    harness: Harness, key: str
) -> None:
    messages = [*HELLO, {"role": "assistant", "content": None, "tool_calls": []}]
    response = harness.chat(key, body_with(messages=messages))
    assert_invalid(harness, response, "messages[1].content")


@pytest.mark.parametrize("content", [42, {"text": "Hello"}, True])
def test_message_content_of_the_wrong_type_is_rejected(
    harness: Harness, key: str, content: Any
) -> None:
    response = harness.chat(key, body_with(messages=[{"role": "user", "content": content}]))
    assert_invalid(harness, response, "messages[0].content")


def test_assistant_null_content_with_tool_calls_passes(harness: Harness, key: str) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    body = body_with(messages=messages)
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"] == body


# --- sampling parameters -----------------------------------------------------------------------

OUT_OF_RANGE = [
    ("temperature", -0.01),
    ("temperature", 2.01),
    ("temperature", 100),
    ("top_p", -0.1),
    ("top_p", 1.5),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 3),
    ("presence_penalty", -3),
    ("presence_penalty", 2.0001),
]
NOT_NUMERIC = ["0.5", True, [1], {"value": 1}]
RANGED = ["temperature", "top_p", "frequency_penalty", "presence_penalty"]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_sampling_parameter_out_of_range_is_rejected(
    harness: Harness, key: str, field: str, value: float
) -> None:
    assert_invalid(harness, harness.chat(key, body_with(**{field: value})), field)


@pytest.mark.parametrize("value", NOT_NUMERIC)
@pytest.mark.parametrize("field", RANGED)
def test_sampling_parameter_not_numeric_is_rejected(
    harness: Harness, key: str, field: str, value: Any
) -> None:
    assert_invalid(harness, harness.chat(key, body_with(**{field: value})), field)


@pytest.mark.parametrize("field", RANGED)
def test_sampling_parameter_nan_is_rejected(harness: Harness, key: str, field: str) -> None:
    content = (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "'
        + field.encode()
        + b'": NaN}'
    )
    assert_invalid(harness, post_raw(harness, key, content), field)


@pytest.mark.parametrize(
    ("field", "low", "high"),
    [
        ("temperature", 0, 2),
        ("top_p", 0, 1),
        ("frequency_penalty", -2, 2),
        ("presence_penalty", -2, 2),
    ],
)
def test_sampling_parameter_at_its_bounds_passes(
    harness: Harness, key: str, field: str, low: float, high: float
) -> None:
    for value in (low, high, (low + high) / 2):
        response = harness.chat(key, body_with(**{field: value}))
        assert response.status_code == 200, response.text
        assert harness.mock.requests[-1]["body"][field] == value


@pytest.mark.parametrize("value", [0, -1, 1.5, 10.0, "10", True, False, [10], 2**31])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_not_a_positive_integer_is_rejected(
    harness: Harness, key: str, field: str, value: Any
) -> None:
    assert_invalid(harness, harness.chat(key, body_with(**{field: value})), field)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_positive_integer_passes(harness: Harness, key: str, field: str) -> None:
    for value in (1, 4096, 2**31 - 1):
        response = harness.chat(key, body_with(**{field: value}))
        assert response.status_code == 200, response.text
        assert harness.mock.requests[-1]["body"][field] == value


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, 129])
def test_n_not_a_positive_integer_up_to_128_is_rejected(
    harness: Harness, key: str, value: Any
) -> None:
    assert_invalid(harness, harness.chat(key, body_with(n=value)), "n")


def test_stop_array_of_five_is_rejected(harness: Harness, key: str) -> None:
    response = harness.chat(key, body_with(stop=["a", "b", "c", "d", "e"]))
    assert_invalid(harness, response, "stop")


@pytest.mark.parametrize("stop", [42, [1, 2], ["a", None], {"a": 1}])
def test_stop_not_strings_is_rejected(harness: Harness, key: str, stop: Any) -> None:
    assert_invalid(harness, harness.chat(key, body_with(stop=stop)), "stop")


@pytest.mark.parametrize("stop", ["END", [], ["a"], ["a", "b", "c", "d"], None])
def test_stop_string_or_up_to_four_passes(harness: Harness, key: str, stop: Any) -> None:
    body = body_with(stop=stop)
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"] == body


@pytest.mark.parametrize("stream", ["true", 1, 0, "false", [], {}])
def test_stream_not_a_boolean_is_rejected(harness: Harness, key: str, stream: Any) -> None:
    assert_invalid(harness, harness.chat(key, body_with(stream=stream)), "stream")


def test_validation_error_on_every_field_is_reported_for_the_first(
    harness: Harness, key: str
) -> None:
    body = {"model": "", "messages": [], "temperature": 9, "stream": "yes"}
    error = assert_invalid(harness, harness.chat(key, body), "model")
    assert error["message"] == "You must specify a model to call"


def test_validation_comes_after_authentication(harness: Harness) -> None:
    response = harness.chat("sk-tg-not-a-key", {"model": ""})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert harness.mock.requests == []


# --- valid requests reach the upstream unchanged -----------------------------------------------

VALID_BODIES: dict[str, dict[str, Any]] = {
    "vision": {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.png", "detail": "low"},
                    },
                    {"type": "video_url", "video_url": {"url": "https://example.com/cat.mp4"}},
                ],
            }
        ],
    },
    "tools": {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "Use the tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": "auto",
    },
    "everything": {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello \u00e9\u4e16\U0001f600"},
        ],
        "temperature": 0.7,
        "top_p": 1,
        "frequency_penalty": -2,
        "presence_penalty": 2,
        "max_tokens": 50,
        "max_completion_tokens": 60,
        "stop": ["\n\n", "END", "STOP", "###"],
        "n": 2,
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": {"type": "json_object"},
        "user": "alice",
        "x_vendor_extension": {"nested": [1, 2, {"deep": None}]},
        "metadata": {"ticket": "T-1"},
        "stream": False,
    },
}


@pytest.mark.parametrize("name", sorted(VALID_BODIES))
def test_valid_request_reaches_upstream_unchanged(harness: Harness, key: str, name: str) -> None:
    body = VALID_BODIES[name]
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert len(harness.mock.requests) == 1
    assert harness.mock.requests[-1]["path"] == "/v1/chat/completions"
    assert harness.mock.requests[-1]["body"] == body


def test_valid_request_bytes_are_forwarded_as_sent(harness: Harness, key: str) -> None:
    """Not re-serialised: key order, spacing and escapes are the client's own."""
    content = (
        b'{ "messages" : [ {"content":"caf\\u00e9 \\ud83d\\ude00","role":"user"} ],'
        b'\n  "model":"gpt-4o-mini", "zzz": 1.50 }'
    )
    response = post_raw(harness, key, content)
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"] == json.loads(content)
    assert harness.mock.requests[-1]["headers"]["content-length"] == str(len(content))


def test_streaming_request_gains_only_include_usage(harness: Harness, key: str) -> None:
    body = {**VALID_BODIES["everything"], "stream": True, "n": 1}
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")
    assert harness.mock.requests[-1]["body"] == {
        **body,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(None, id="null"),
        pytest.param({}, id="empty"),
        pytest.param({"include_usage": False}, id="false"),
        pytest.param({"include_usage": True}, id="true"),
        pytest.param({"include_usage": False, "vendor": "x"}, id="other-fields"),
    ],
)
def test_streaming_request_with_stream_options_gets_include_usage(
    harness: Harness, key: str, options: dict[str, Any] | None
) -> None:
    body = body_with(stream=True, stream_options=options)
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    expected = {**(options or {}), "include_usage": True}
    assert harness.mock.requests[-1]["body"] == {**body, "stream_options": expected}
    assert '"usage":{' in response.text


def test_non_streaming_request_gets_no_stream_options(harness: Harness, key: str) -> None:
    body = body_with(stream=False)
    assert harness.chat(key, body).status_code == 200
    assert "stream_options" not in harness.mock.requests[-1]["body"]


def test_inject_stream_usage_off_forwards_the_body_untouched_and_estimates_usage(
    settings: Any, harness_factory: Any
) -> None:
    with harness_factory(settings, inject_stream_usage=False) as harness:
        record = harness.create_key()
        body = {"model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "Hello there"}]}  # fmt: skip
        response = harness.chat(record["key"], body)
        assert response.status_code == 200
        assert harness.mock.requests[-1]["body"] == body
        assert '"usage":{' not in response.text
        usage = harness.admin(
            "GET", f"/admin/keys/{record['id']}/usage", params={"group_by": "model"}
        ).json()
        assert usage["totals"]["requests"] == 1
        assert usage["totals"]["completion_tokens"] > 0  # estimated from the streamed text
