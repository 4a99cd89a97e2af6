"""One admitted request from the upstream call to its settlement: answers relayed byte for
byte, upstream errors and wrong answers as 502, 4xx passed through, the deadline as a 504."""

from __future__ import annotations

import httpx
import pytest

from proxy.config import Settings
from tests.answers import assert_error, completion
from tests.conftest import HELLO, Harness, HarnessFactory


def test_upstream_response_body_comes_back_byte_for_byte(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    raw = (
        b'{"id":"x",  "object":"chat.completion","choices":[],\n'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"z":"\\u00e9"}'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=raw, headers={"content-type": "application/json"})

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        response = harness.chat(harness.create_key()["key"], HELLO)
        assert response.status_code == 200
        assert response.content == raw


def test_upstream_500_is_502(harness: Harness, key: str) -> None:
    response = harness.chat(key, {**HELLO, "model": "mock-error"})
    assert_error(response, 502, "upstream_error")
    assert len(harness.mock.requests) == 1


def test_upstream_500_on_stream_is_502(harness: Harness, key: str) -> None:
    response = harness.chat(key, {**HELLO, "model": "mock-error", "stream": True})
    assert_error(response, 502, "upstream_error")


def test_upstream_200_that_is_not_json_is_502(harness: Harness, key: str) -> None:
    response = harness.chat(key, {**HELLO, "model": "mock-bad-json"})
    assert_error(response, 502, "upstream_error")


@pytest.mark.parametrize(
    "content",
    [b"[1, 2, 3]", b'"a string"', b"", b'{"truncated": '],
)
def test_upstream_200_that_is_not_a_json_object_is_502(
    harness_factory: HarnessFactory, settings: Settings, content: bytes
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        response = harness.chat(harness.create_key()["key"], HELLO)
        assert_error(response, 502, "upstream_error")


def test_upstream_json_answer_to_a_stream_request_is_502(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=completion())

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        response = harness.chat(harness.create_key()["key"], {**HELLO, "stream": True})
        assert_error(response, 502, "upstream_error")


def test_upstream_404_is_passed_through_unchanged(harness: Harness, key: str) -> None:
    response = harness.chat(key, {**HELLO, "model": "mock-not-found"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `mock-not-found` does not exist",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("status", [400, 401, 409, 422, 429])
def test_upstream_4xx_is_passed_through_unchanged(
    harness_factory: HarnessFactory, settings: Settings, status: int
) -> None:
    raw = b'{"error": {"message": "upstream says no", "type": "x", "param": null, "code": "c"}}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=raw, headers={"content-type": "application/json"})

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        response = harness.chat(harness.create_key()["key"], HELLO)
        assert response.status_code == status
        assert response.content == raw


def test_upstream_timeout_is_504_naming_the_limit(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, upstream_timeout_s=0.5) as harness:
        record = harness.create_key()
        response = harness.chat(record["key"], {**HELLO, "model": "mock-hang"})
        error = assert_error(response, 504, "upstream_timeout", "upstream_timeout")
        assert error["message"] == "Request timed out (0.5-second upstream limit)"
        groups = harness.key_usage(record["id"])["groups"]
        assert [(g["model"], g["requests"]) for g in groups] == [("mock-hang", 1)]
        [usage_record] = harness.export()
        assert usage_record["status"] == 504
        assert usage_record["request_id"] == response.headers["x-request-id"]
