"""Hostile and odd request bodies against a real server: each gets a clear 4xx (or passes
through when it is valid), never a 500, and the server keeps serving afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    MESSAGES,
    Mock,
    Stack,
    new_request_id,
    running_mock,
    running_stack,
)
from tests.servers import RedisServer

MODEL = "gpt-4o-mini"
ELEVEN_MB = 11 * 1024 * 1024


@pytest.fixture(scope="module")
def mock() -> Iterator[Mock]:
    """This module's own upstream: the 10 MB bodies it keeps must not slow other modules."""
    with running_mock() as mock:
        yield mock


@pytest.fixture(scope="module")
def stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(redis_store, mock, tmp_path_factory.mktemp("spool-robust")) as stack:
        yield stack


def chat_bytes(**fields: Any) -> bytes:
    """A chat body serialised the way a careful client would (ASCII-only JSON)."""
    return json.dumps({"model": MODEL, "messages": MESSAGES, **fields}).encode()


def deep_messages(depth: int) -> bytes:
    return b'{"model":"gpt-4o-mini","messages":' + b"[" * depth + b"]" * depth + b"}"


def chunked(payload: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """A body sent without content-length (chunked), so only the streamed count can stop it."""
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


def assert_still_serving(stack: Stack, client: httpx.Client) -> None:
    assert stack.proxy.process is not None and stack.proxy.process.poll() is None
    assert httpx.get(stack.url + "/healthz", timeout=5).status_code == 200
    normal = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert normal.status_code == 200, normal.text
    assert normal.json()["choices"][0]["message"]["content"]


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(b"hello, not json", None, id="not-json"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b'{"model": "gpt-4o-mini", "messages": [', None, id="truncated"),
        pytest.param(b'{"model":"gpt-4o-mini"} trailing', None, id="trailing-garbage"),
        pytest.param(
            b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff\xfe\xc3"}]}',
            None,
            id="invalid-utf8",
        ),
        pytest.param(b"[" + chat_bytes() + b"]", None, id="json-array"),
        pytest.param(b'"a string"', None, id="json-string"),
        pytest.param(b"null", None, id="json-null"),
        pytest.param(b"42", None, id="json-number"),
        pytest.param(b"[" * 200_000, None, id="deep-unbalanced"),
        pytest.param(deep_messages(200_000), None, id="deep-balanced"),
        pytest.param(
            b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a\x00b"}]}',
            None,
            id="raw-nul-byte",
        ),
        pytest.param(b"\x00" * 1024, None, id="only-nul-bytes"),
        pytest.param(chat_bytes(model="\ud800"), "model", id="lone-surrogate-model"),
        pytest.param(chat_bytes(temperature=float("nan")), "temperature", id="nan-temperature"),
        pytest.param(chat_bytes(top_p=float("inf")), "top_p", id="infinite-top-p"),
        pytest.param(chat_bytes(max_tokens=10**100), "max_tokens", id="huge-max-tokens"),
        pytest.param(chat_bytes(max_tokens=1.5), "max_tokens", id="float-max-tokens"),
        pytest.param(chat_bytes(max_tokens=True), "max_tokens", id="bool-max-tokens"),
        pytest.param(
            b'{"model":"gpt-4o-mini","messages":[],"max_tokens":' + b"9" * 5000 + b"}",
            None,
            id="5000-digit-number",
        ),
        pytest.param(chat_bytes(stream="yes"), "stream", id="string-stream"),
        pytest.param(chat_bytes(messages="hello"), "messages", id="messages-string"),
        pytest.param(chat_bytes(messages=[1, 2]), "messages[0]", id="messages-numbers"),
        pytest.param(chat_bytes(model=["gpt-4o-mini"]), "model", id="model-array"),
        pytest.param(chat_bytes(model=" "), "model", id="model-blank"),
    ],
)
def test_malformed_body_is_refused_with_400_and_server_keeps_serving(
    client: httpx.Client, stack: Stack, mock: Mock, body: bytes, param: str | None
) -> None:
    before = len(mock.received())
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )

    error = assert_error(response, 400, "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    assert len(mock.received()) == before
    assert_still_serving(stack, client)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_refused_with_413(
    client: httpx.Client, stack: Stack, mock: Mock, declared: bool
) -> None:
    filler = "x" * ELEVEN_MB
    payload = chat_bytes(messages=[{"role": "user", "content": filler}])
    before = len(mock.received())
    response = client.post(
        "/v1/chat/completions",
        content=payload if declared else chunked(payload),
        headers={"content-type": "application/json"},
    )

    error = assert_error(response, 413, "invalid_request_error")
    assert error["code"] == "request_too_large"
    assert len(mock.received()) == before
    assert_still_serving(stack, client)


def test_five_thousand_messages_pass_through(
    client: httpx.Client, stack: Stack, mock: Mock
) -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
        for i in range(5000)
    ]
    request_id = new_request_id()
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages},
        headers={"x-request-id": request_id},
    )

    assert response.status_code == 200, response.text
    assert mock.request_with_id(request_id)["body"]["messages"] == messages
    assert_still_serving(stack, client)


def test_escaped_nul_and_odd_unicode_in_content_pass_through_unchanged(
    client: httpx.Client, mock: Mock
) -> None:
    content = "nul \u0000 here, emoji \U0001f600, rtl \u202e, bell \u0007 end"
    request_id = new_request_id()
    response = client.post(
        "/v1/chat/completions",
        content=chat_bytes(messages=[{"role": "user", "content": content}]),
        headers={"content-type": "application/json", "x-request-id": request_id},
    )

    assert response.status_code == 200, response.text
    assert mock.request_with_id(request_id)["body"]["messages"][0]["content"] == content


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8"],
    ids=["absent", "text-plain", "form", "json-charset"],
)
def test_json_body_is_read_whatever_the_content_type(
    client: httpx.Client, stack: Stack, mock: Mock, content_type: str | None
) -> None:
    request_id = new_request_id()
    headers = {"x-request-id": request_id}
    if content_type is not None:
        headers["content-type"] = content_type
    response = client.post("/v1/chat/completions", content=chat_bytes(), headers=headers)

    assert response.status_code == 200, response.text
    assert mock.request_with_id(request_id)["body"] == {"model": MODEL, "messages": MESSAGES}
    assert_still_serving(stack, client)


def test_form_encoded_body_is_refused_with_400(client: httpx.Client, stack: Stack) -> None:
    response = client.post("/v1/chat/completions", data={"model": MODEL, "messages": "hi"})

    assert_error(response, 400, "invalid_request_error")
    assert_still_serving(stack, client)


def test_messages_with_unencodable_model_is_400_before_the_upstream(
    client: httpx.Client, stack: Stack
) -> None:
    body = {"model": "\udfff", "max_tokens": 5, "messages": MESSAGES}
    before = len(stack.mock.received())
    response = client.post(
        "/v1/messages", content=json.dumps(body), headers={"content-type": "application/json"}
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert len(stack.mock.received()) == before
    assert_still_serving(stack, client)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer sk-tg-" + "z" * 5000,
        "Bearer sk-tg-0123456789abcdef_" + "A" * 200,
        "Bearer sk-tg-0123456789abcdef_" + "A" * 31,
        "bearer\tsk-tg-0123456789abcdef_" + "A" * 40,
    ],
    ids=["empty", "basic", "long", "secret-too-long", "secret-too-short", "tab"],
)
def test_odd_authorization_is_401_and_nothing_goes_upstream(
    stack: Stack, mock: Mock, authorization: str
) -> None:
    before = len(mock.received())
    response = httpx.post(
        stack.url + "/v1/chat/completions",
        content=chat_bytes(),
        headers={"authorization": authorization, "content-type": "application/json"},
    )

    error = assert_error(response, 401, "authentication_error")
    assert error["code"] == "invalid_api_key"
    assert response.headers["x-should-retry"] == "false"
    assert len(mock.received()) == before


def test_unknown_path_and_wrong_method_answer_openai_style_errors(
    client: httpx.Client, stack: Stack
) -> None:
    missing = client.get("/no/such/path")
    wrong_method = client.delete("/healthz")

    assert_error(missing, 404, "invalid_request_error")
    assert_error(wrong_method, 405, "invalid_request_error")
    assert_still_serving(stack, client)


# Last in the module: every later look at what the mock received would carry its 10 MB.
def test_body_just_under_the_limit_passes_through(client: httpx.Client, mock: Mock) -> None:
    request_id = new_request_id()
    overhead = len(chat_bytes(messages=[{"role": "user", "content": ""}]))
    content = "y" * (10 * 1024 * 1024 - overhead)
    payload = chat_bytes(messages=[{"role": "user", "content": content}])
    assert len(payload) == 10 * 1024 * 1024
    response = client.post(
        "/v1/chat/completions",
        content=payload,
        headers={"content-type": "application/json", "x-request-id": request_id},
    )

    assert response.status_code == 200, response.text[:300]
    assert mock.request_with_id(request_id)["body"]["messages"][0]["content"] == content
