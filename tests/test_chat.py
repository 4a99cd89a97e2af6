"""Chat Completions bodies out of the ordinary: bad input is a 400 and never a 500, odd but valid
input (deep, huge, NUL, thousands of messages, wrong content type) reaches the upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.answers import assert_error
from tests.conftest import HELLO, Harness, bearer


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"[" * 100_000, id="arrays"),
        pytest.param(b'{"a":' * 100_000, id="objects"),
        pytest.param(
            b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            id="inside-a-valid-request",
        ),
    ],
)
def test_deeply_nested_json_is_400(harness: Harness, key: str, content: bytes) -> None:
    response = harness.client.post("/v1/chat/completions", content=content, headers=bearer(key))
    assert_error(response, 400, "invalid_request_error")
    assert harness.mock.requests == []


def test_thousands_of_messages_pass(harness: Harness, key: str) -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
        for i in range(5000)
    ]
    response = harness.chat(key, {**HELLO, "messages": messages})
    assert response.status_code == 200, response.text
    assert len(harness.mock.requests[-1]["body"]["messages"]) == 5000


def test_thousands_of_messages_with_one_bad_one_name_it(harness: Harness, key: str) -> None:
    messages = [{"role": "user", "content": "ok"}] * 4999 + [{"role": "user"}]
    response = harness.chat(key, {**HELLO, "messages": messages})
    error = assert_error(response, 400, "invalid_request_error")
    assert error["param"] == "messages[4999].content"


def test_huge_string_just_under_the_default_limit_passes(harness: Harness, key: str) -> None:
    limit = harness.gateway.settings.max_body_bytes
    template = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"%s"}]}'
    content = (template % ("y" * (limit - len(template % "")))).encode()
    assert len(content) == limit
    response = harness.client.post("/v1/chat/completions", content=content, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert len(harness.mock.requests[-1]["body"]["messages"][0]["content"]) > limit - 100


def test_nul_bytes_escaped_in_json_pass_through(harness: Harness, key: str) -> None:
    body = {
        "model": "gpt-4o-mini\u0000",
        "messages": [{"role": "user", "content": "a\u0000b"}],
        "user": "\u0000",
    }
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"] == body


def test_raw_nul_bytes_are_400(harness: Harness, key: str) -> None:
    content = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a\x00b"}]}'
    response = harness.client.post("/v1/chat/completions", content=content, headers=bearer(key))
    assert_error(response, 400, "invalid_request_error")
    only_nul = harness.client.post("/v1/chat/completions", content=b"\x00", headers=bearer(key))
    assert_error(only_nul, 400, "invalid_request_error")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream", "nonsense"],
)
def test_wrong_content_type_with_a_json_body_is_not_an_error(
    harness: Harness, key: str, content_type: str
) -> None:
    headers = {**bearer(key), "content-type": content_type}
    response = harness.client.post(
        "/v1/chat/completions", content=json.dumps(HELLO).encode(), headers=headers
    )
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"] == HELLO


def test_multipart_body_is_400(harness: Harness, key: str) -> None:
    response = harness.client.post(
        "/v1/chat/completions",
        files={"file": ("a.txt", b"hello")},
        data={"model": "gpt-4o-mini"},
        headers=bearer(key),
    )
    assert_error(response, 400, "invalid_request_error")
    assert harness.mock.requests == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({**HELLO, "model": "m" * 256}, id="longest-model"),
        pytest.param({**HELLO, "model": "\u4e16\u754c-\U0001f600"}, id="unicode-model"),
        pytest.param(
            {**HELLO, "messages": [{"role": "user", "content": [1, None, "x", {"type": 7}]}]},
            id="odd-content-parts",
        ),
        pytest.param({**HELLO, "tools": "not-a-list", "n": 128}, id="odd-tools"),
        pytest.param({**HELLO, "stream_options": "x", "stream": True}, id="odd-stream-options"),
        pytest.param({**HELLO, "max_tokens": 2**31 - 1, "n": 128}, id="largest-allowed"),
    ],
)
def test_odd_but_valid_requests_do_not_fail_inside_tollgate(
    harness: Harness, key: str, body: dict[str, Any]
) -> None:
    response = harness.chat(key, body)
    assert response.status_code == 200, response.text
    assert harness.mock.requests[-1]["body"]["model"] == body["model"]
