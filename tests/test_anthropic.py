"""The Anthropic Messages surface: its checks, its estimate, its usage in JSON and in
`message_start`/`message_delta`, its error shape; and the Anthropic routes on the app (key
forms, the upstream they reach, refusals in Anthropic's shape, count_tokens)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from proxy.config import Settings
from proxy.errors import (
    AuthenticationFailed,
    InsufficientCredits,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    ProxyError,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from proxy.metering import CHARS_PER_TOKEN, TOKENS_PER_IMAGE, TOKENS_PER_MESSAGE
from proxy.registry import UpstreamConfig
from proxy.surfaces.anthropic import Messages, MessagesMeter, TokenCount
from tests.conftest import Harness, HarnessFactory

SETTINGS = Settings(default_max_tokens=100)
MODEL = "claude-test"
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "x" * 400}],
}
USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "output_tokens": 30,
}


def parse(body: dict[str, Any]) -> Any:
    return Messages().parse(json.dumps(body).encode(), SETTINGS)


def event(kind: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def message_start(usage: dict[str, Any]) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": usage}
    return event("message_start", {"message": message})


def text_delta(text: str) -> bytes:
    return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


def tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


# --- parse -----------------------------------------------------------------------------------


def test_parse_reserves_the_estimate_up_to_max_tokens_and_sends_the_body_as_is() -> None:
    raw = json.dumps({**BODY, "stream": True}).encode()
    parsed = Messages().parse(raw, SETTINGS)
    assert (parsed.model, parsed.stream, parsed.priced) == (MODEL, True, True)
    assert parsed.content == raw  # an Anthropic stream always carries its usage
    assert parsed.completion_max == 50  # max_tokens, never the default
    assert parsed.prompt_estimate == 400 // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE + 3
    assert not parse(BODY).stream


def test_estimate_counts_system_text_media_tool_blocks_and_tools() -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": "P"}}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}
    document = {"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "d" * 40}
    body = {
        **BODY,
        "system": [{"type": "text", "text": "s" * 40}, {"type": "text", "text": "t" * 40}],
        "tools": tools,
        "messages": [
            {"role": "user", "content": "a" * 80},
            {"role": "user", "content": [{"type": "text", "text": "b" * 40}, image, document]},
            {"role": "assistant", "content": [{"type": "text", "text": "c" * 40}, tool_use]},
            {"role": "user", "content": [result]},
        ],
    }
    result_rest = json.dumps({k: v for k, v in result.items() if k != "content"})
    chars = 80 + len(json.dumps(tools)) + 80 + 40 + 40 + len(json.dumps(tool_use))
    chars += 40 + len(result_rest)
    expected = tokens(chars) + 5 * TOKENS_PER_MESSAGE + 2 * TOKENS_PER_IMAGE + 3
    assert parse(body).prompt_estimate == expected
    assert parse({**BODY, "system": "s" * 40}).prompt_estimate == tokens(440) + 2 * 4 + 3


def test_an_image_inside_a_tool_result_counts_as_an_image_not_as_its_base64() -> None:
    screenshot = {"type": "image", "source": {"type": "base64", "data": "A" * 400_000}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": [screenshot]}
    estimate = parse({**BODY, "messages": [{"role": "user", "content": [result]}]}).prompt_estimate
    assert TOKENS_PER_IMAGE < estimate < TOKENS_PER_IMAGE + 100


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 5, "messages": BODY["messages"]}, "model"),
        ({**BODY, "model": ""}, "model"),
        ({**BODY, "model": 7}, "model"),
        ({**BODY, "model": "m" * 257}, "model"),
        ({"model": MODEL, "messages": BODY["messages"]}, "max_tokens"),
        ({**BODY, "max_tokens": None}, "max_tokens"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "max_tokens": -1}, "max_tokens"),
        ({**BODY, "max_tokens": "50"}, "max_tokens"),
        ({**BODY, "max_tokens": 5.0}, "max_tokens"),
        ({**BODY, "max_tokens": True}, "max_tokens"),
        ({**BODY, "max_tokens": 2**31}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5}, "messages"),
        ({**BODY, "messages": []}, "messages"),
        ({**BODY, "messages": {"role": "user", "content": "hi"}}, "messages"),
        ({**BODY, "stream": "true"}, "stream"),
        ({**BODY, "stream": 1}, "stream"),
        ({**BODY, "system": 5}, "system"),
        ({**BODY, "system": ["be brief"]}, "system"),
        ({**BODY, "system": [{"type": "image", "source": {}}]}, "system"),
        ({**BODY, "system": [{"type": "text", "text": None}]}, "system"),
    ],
)
def test_parse_refuses_what_tollgate_relies_on_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(body)
    assert refused.value.param == param


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"{", b"\xff"])
def test_parse_refuses_a_body_that_is_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        Messages().parse(raw, SETTINGS)


# --- usage -----------------------------------------------------------------------------------


def test_json_usage_bills_cache_tokens_as_input_and_keeps_them_in_details() -> None:
    messages = Messages()
    answer = {"type": "message", "content": [{"type": "text", "text": "Hi"}], "usage": USAGE}
    usage = messages.usage_from_json(json.dumps(answer).encode(), parse(BODY))
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (312, 30, "upstream")
    assert usage.details == {"cache_creation_input_tokens": 100, "cache_read_input_tokens": 200}
    plain = {"input_tokens": 5, "output_tokens": 2}
    usage = messages.usage_from_json(json.dumps({"usage": plain}).encode(), parse(BODY))
    assert usage is not None and (usage.prompt_tokens, usage.details) == (5, None)


def test_json_answer_that_is_not_a_message_is_invalid_and_odd_usage_is_none() -> None:
    messages = Messages()
    for payload in (b"<html>", b"[1]", b'"text"'):
        with pytest.raises(UpstreamFailed):
            messages.usage_from_json(payload, parse(BODY))
    with pytest.raises(UpstreamFailed):
        messages.usage_from_json(b'{"usage": {}}', parse({**BODY, "stream": True}))
    for odd in ({"input_tokens": "3", "output_tokens": 1}, {"output_tokens": 1}, None, [1]):
        assert messages.usage_from_json(json.dumps({"usage": odd}).encode(), parse(BODY)) is None


def test_stream_usage_is_message_start_input_and_the_last_message_delta_output() -> None:
    stream = (
        message_start({**USAGE, "output_tokens": 1})
        + event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        + event("ping", {})
        + text_delta('"type":"message_delta","usage":{"output_tokens":999}')
        + event("message_delta", {"delta": {"stop_reason": None}, "usage": {"output_tokens": 20}})
        + event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": USAGE})
        + event("message_stop", {})
    )
    for size in (1, 7, len(stream)):
        meter = Messages().stream_meter()
        for start in range(0, len(stream), size):
            meter.feed(stream[start : start + size])
        usage = meter.usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (312, 30, "upstream")
        assert usage.details == {"cache_creation_input_tokens": 100, "cache_read_input_tokens": 200}


def test_stream_usage_reads_data_only_events_and_ignores_other_events_usage() -> None:
    meter = MessagesMeter()
    meter.feed(event("content_block_delta", {"usage": USAGE, "delta": {"type": "text_delta"}}))
    assert meter.usage is None
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 9}}}
    meter.feed(b"data: " + json.dumps(start).encode() + b"\n\n")
    meter.feed(b'data: {"type":"message_delta","usage":{"output_tokens":4}}\n\n')
    assert meter.usage is not None
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (9, 4)


def test_cut_stream_is_estimated_from_its_message_start_and_the_text_streamed() -> None:
    meter = MessagesMeter()
    meter.feed(text_delta("x" * 40))
    assert meter.usage is None  # before message_start nothing is known: the lifecycle estimates
    meter.feed(message_start({"input_tokens": 12, "cache_read_input_tokens": 200}))
    meter.feed(text_delta("y" * 41))
    tool = {"type": "input_json_delta", "partial_json": '{"c": 1}'}
    meter.feed(event("content_block_delta", {"index": 1, "delta": tool}))
    usage = meter.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.source) == (212, "estimated")
    assert usage.completion_tokens == tokens(40 + 41 + len('{\\"c\\": 1}'))
    assert usage.details == {"cache_read_input_tokens": 200}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequest("bad", param="max_tokens"), "invalid_request_error"),
        (AuthenticationFailed(), "authentication_error"),
        (InsufficientCredits("poor"), "billing_error"),
        (ModelNotAllowed("no"), "permission_error"),
        (ModelNotFound("none"), "not_found_error"),
        (MethodNotAllowed("GET"), "invalid_request_error"),
        (RequestTooLarge("big"), "request_too_large"),
        (RateLimited("slow down"), "rate_limit_error"),
        (InternalError(), "api_error"),
        (UpstreamFailed("down", reason="connect"), "api_error"),
        (StoreUnavailable("store"), "overloaded_error"),
        (UpstreamTimeout(180), "api_error"),
    ],
)
def test_errors_take_anthropics_shape_and_type(error: ProxyError, kind: str) -> None:
    body = json.loads(Messages().error_body(error))
    assert body == {"type": "error", "error": {"type": kind, "message": error.message}}


def test_a_stream_that_fails_midway_ends_with_an_anthropic_error_event() -> None:
    ending = Messages().error_event(UpstreamFailed("cut", reason="connect"))
    assert ending.startswith(b"event: error\ndata: ") and ending.endswith(b"\n\n")
    data = json.loads(ending.split(b"data: ", 1)[1])
    assert data == {"type": "error", "error": {"type": "api_error", "message": "cut"}}


def test_token_count_reserves_nothing_and_reports_zero_usage() -> None:
    count = TokenCount()
    parsed = count.parse(
        json.dumps({"model": MODEL, "messages": BODY["messages"]}).encode(), SETTINGS
    )
    assert (parsed.prompt_estimate, parsed.completion_max, parsed.priced) == (0, 0, False)
    usage = count.usage_from_json(b'{"input_tokens": 120}', parsed)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (0, 0)
    with pytest.raises(InvalidRequest):
        count.parse(json.dumps({"model": MODEL, "messages": []}).encode(), SETTINGS)
    with pytest.raises(UpstreamFailed):
        count.usage_from_json(b"<html>", parsed)
    assert not count.accepts_stream(parsed)


# --- the routes ------------------------------------------------------------------------------


def post(harness: Harness, body: Any, *, path: str = "/v1/messages", **headers: str) -> Any:
    return harness.client.post(path, json=body, headers=headers)


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    """The response is an Anthropic-shaped error of this status and type; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    message: str = body["error"]["message"]
    assert message
    return message


@pytest.mark.parametrize("path", ["/v1/messages", "/anthropic/v1/messages", "/api/v1/messages"])
@pytest.mark.parametrize("key_header", ["x-api-key", "authorization"])
def test_either_key_form_is_accepted_and_the_client_key_never_goes_upstream(
    harness: Harness, key: str, path: str, key_header: str
) -> None:
    value = key if key_header == "x-api-key" else f"Bearer {key}"
    headers = {key_header: value, "anthropic-version": "2023-06-01", "anthropic-beta": "b-1"}
    response = post(harness, BODY, path=path, **headers)

    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"
    upstream = harness.mock.requests[-1]
    # TOLLGATE_UPSTREAM_URL alone also serves the Anthropic route, below its URL, with its key.
    assert upstream["path"] == "/v1/messages"
    assert upstream["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert "x-api-key" not in upstream["headers"]
    assert upstream["headers"]["anthropic-version"] == "2023-06-01"
    assert upstream["headers"]["anthropic-beta"] == "b-1"
    assert key not in json.dumps(upstream)


@pytest.mark.parametrize("url", ["http://claude.test", "http://claude.test/v1/"])
def test_an_anthropic_upstream_gets_the_operators_key_as_x_api_key_below_its_v1(
    harness_factory: HarnessFactory, settings: Settings, url: str
) -> None:
    claude = UpstreamConfig(name="claude", url=url.rstrip("/"), api="anthropic", api_key="sk-ant")
    with harness_factory(settings, upstreams=(claude,)) as harness:
        key = harness.create_key()["key"]
        response = post(harness, BODY, **{"x-api-key": key})
        assert response.status_code == 200, response.text
        upstream = harness.mock.requests[-1]
        assert upstream["path"] == "/v1/messages"
        assert upstream["headers"]["x-api-key"] == "sk-ant"
        assert upstream["headers"]["anthropic-version"] == "2023-06-01"  # defaulted
        assert "authorization" not in upstream["headers"]
        counted = post(harness, BODY, path="/v1/messages/count_tokens", **{"x-api-key": key})
        assert counted.status_code == 200, counted.text
        assert harness.mock.requests[-1]["path"] == "/v1/messages/count_tokens"


def test_a_registry_without_an_anthropic_upstream_answers_404_not_found_error(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    openai_only = (UpstreamConfig(name="openai", url=settings.upstream_url),)
    with harness_factory(settings, upstreams=openai_only) as harness:
        key = harness.create_key(credits=1)
        response = post(harness, BODY, **{"x-api-key": key["key"]})
        anthropic_error(response, 404, "not_found_error")
        assert harness.mock.requests == []
        after = harness.admin("GET", f"/admin/keys/{key['id']}").json()
        assert after["reserved_credits"] == 0


def test_refusals_before_the_upstream_are_in_anthropics_shape_with_their_headers(
    harness: Harness,
) -> None:
    anthropic_error(post(harness, BODY), 401, "authentication_error")
    missing = post(harness, BODY, **{"x-api-key": ""})
    assert anthropic_error(missing, 401, "authentication_error")
    assert missing.headers["x-should-retry"] == "false"
    bad = post(harness, BODY, **{"x-api-key": "sk-tg-" + "x" * 40})
    anthropic_error(bad, 401, "authentication_error")
    basic = post(harness, BODY, authorization="Basic dXNlcjpwYXNz")
    anthropic_error(basic, 401, "authentication_error")

    key = harness.create_key(rpm=1, allowed_models=[MODEL])["key"]
    no_limit = {k: v for k, v in BODY.items() if k != "max_tokens"}
    message = anthropic_error(
        post(harness, no_limit, **{"x-api-key": key}), 400, "invalid_request_error"
    )
    assert "max_tokens" in message
    garbled = harness.client.post("/v1/messages", content=b"{", headers={"x-api-key": key})
    anthropic_error(garbled, 400, "invalid_request_error")
    other = post(harness, {**BODY, "model": "claude-other"}, **{"x-api-key": key})
    anthropic_error(other, 403, "permission_error")
    assert other.headers["x-should-retry"] == "false"
    assert post(harness, BODY, **{"x-api-key": key}).status_code == 200
    limited = post(harness, BODY, **{"x-api-key": key})
    anthropic_error(limited, 429, "rate_limit_error")
    assert int(limited.headers["retry-after-ms"]) > 0
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit-requests"] == "1"

    poor = harness.create_key(credits=0.000001)["key"]
    before = len(harness.mock.requests)
    refused = post(harness, BODY, **{"x-api-key": poor})
    anthropic_error(refused, 402, "billing_error")
    assert refused.headers["x-should-retry"] == "false"
    assert len(harness.mock.requests) == before


def test_an_upstream_failure_is_an_anthropic_api_error(harness: Harness, key: str) -> None:
    response = post(harness, {**BODY, "model": "mock-error"}, **{"x-api-key": key})
    anthropic_error(response, 502, "api_error")
    streamed = post(harness, {**BODY, "model": "mock-error", "stream": True}, **{"x-api-key": key})
    anthropic_error(streamed, 502, "api_error")


def test_count_tokens_is_admitted_and_recorded_with_zero_tokens_and_no_charge(
    harness: Harness,
) -> None:
    record = harness.create_key(credits=1, rpm=10)
    body = {"model": MODEL, "messages": BODY["messages"], "system": "Be brief"}
    for path in ("/v1/messages/count_tokens", "/anthropic/v1/messages/count_tokens"):
        response = post(harness, body, path=path, **{"x-api-key": record["key"]})
        assert response.status_code == 200, response.text
        assert response.json()["input_tokens"] > 0
        assert harness.mock.requests[-1]["path"] == "/v1/messages/count_tokens"
    assert response.headers["x-ratelimit-remaining-requests"] == "8"
    records = [r for r in harness.export() if r["key_id"] == record["id"]]
    assert [(r["prompt_tokens"], r["completion_tokens"], r["cost_usd"]) for r in records] == [
        (0, 0, 0),
        (0, 0, 0),
    ]
    after = harness.admin("GET", f"/admin/keys/{record['id']}").json()
    assert (after["credits"], after["reserved_credits"]) == (1, 0)
    refused = post(harness, {"model": MODEL}, path="/v1/messages/count_tokens")
    anthropic_error(refused, 401, "authentication_error")


def test_the_upstreams_own_anthropic_quota_headers_stay_upstream(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-tokens-limit": "400000",
            "anthropic-organization-id": "org-of-the-operator",
            "request-id": "req_upstream",
        }
        answer = {
            "type": "message",
            "content": [],
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
        return httpx.Response(200, json=answer, headers=headers)

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        key = harness.create_key(tpm=1000)["key"]
        response = post(harness, BODY, **{"x-api-key": key})
        assert response.status_code == 200, response.text
        assert not [h for h in response.headers if h.startswith("anthropic-")]
        assert response.headers["request-id"] == "req_upstream"
        assert response.headers["x-ratelimit-remaining-tokens"]
