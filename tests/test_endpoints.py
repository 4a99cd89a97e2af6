"""The client-facing handlers before admission: the bearer credential they read, and the request
body they read, refused with 413 past TOLLGATE_MAX_BODY_BYTES (declared, chunked or sent)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from proxy.config import Settings
from tests.answers import assert_auth_failed, assert_error
from tests.conftest import HELLO, Harness, HarnessFactory, bearer


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"authorization": ""}, id="empty"),
        pytest.param({"authorization": "Bearer"}, id="no-token"),
        pytest.param({"authorization": "Bearer "}, id="blank-token"),
        pytest.param({"authorization": "Basic dXNlcjpwYXNz"}, id="basic"),
        pytest.param({"authorization": "Token sk-tg-0123456789abcdef_" + "a" * 43}, id="token"),
        pytest.param({"api-key": "sk-tg-0123456789abcdef_" + "a" * 43}, id="azure-header"),
    ],
)
def test_missing_or_non_bearer_authorization_is_401(
    harness: Harness, headers: dict[str, str]
) -> None:
    response = harness.client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert_auth_failed(response)
    assert harness.mock.requests == []


def test_non_ascii_authorization_is_401(harness: Harness) -> None:
    headers = [(b"authorization", "Bearer sk-tg-\u00e9\u00e9\u00e9".encode("latin-1"))]
    response = harness.client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert_auth_failed(response)


def test_lowercase_bearer_scheme_is_accepted(harness: Harness, key: str) -> None:
    headers = {"authorization": f"bearer {key}"}
    assert (
        harness.client.post("/v1/chat/completions", json=HELLO, headers=headers).status_code == 200
    )


def test_body_over_max_body_bytes_is_413(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, max_body_bytes=1000) as harness:
        key = harness.create_key()["key"]
        body = {**HELLO, "messages": [{"role": "user", "content": "x" * 2000}]}
        response = harness.chat(key, body)
        error = assert_error(response, 413, "invalid_request_error", "request_too_large")
        assert "1000" in error["message"]
        assert harness.mock.requests == []


def test_declared_length_over_max_body_bytes_is_413_before_reading(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, max_body_bytes=1000) as harness:
        key = harness.create_key()["key"]
        headers = {**bearer(key), "content-length": str(10**9)}
        response = harness.client.post(
            "/v1/chat/completions", content=json.dumps(HELLO).encode(), headers=headers
        )
        assert_error(response, 413, "invalid_request_error", "request_too_large")
        assert harness.mock.requests == []


def test_chunked_body_over_max_body_bytes_is_413(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, max_body_bytes=1000) as harness:
        key = harness.create_key()["key"]

        def chunks() -> Iterator[bytes]:
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        response = harness.client.post(
            "/v1/chat/completions", content=chunks(), headers=bearer(key)
        )
        assert_error(response, 413, "invalid_request_error", "request_too_large")
        assert harness.mock.requests == []


def test_body_of_exactly_max_body_bytes_passes(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, max_body_bytes=1000) as harness:
        key = harness.create_key()["key"]
        template = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"%s"}]}'
        exact = (template % ("x" * (1000 - len(template % "")))).encode()
        assert len(exact) == 1000
        response = harness.client.post("/v1/chat/completions", content=exact, headers=bearer(key))
        assert response.status_code == 200, response.text
        over = exact.replace(b'"x', b'"xx', 1)
        response = harness.client.post("/v1/chat/completions", content=over, headers=bearer(key))
        assert_error(response, 413, "invalid_request_error", "request_too_large")


def test_passthrough_body_over_max_body_bytes_is_413(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, max_body_bytes=1000) as harness:
        key = harness.create_key()["key"]
        body = {"model": "text-embedding-3-small", "input": "x" * 2000}
        response = harness.client.post("/v1/embeddings", json=body, headers=bearer(key))
        assert_error(response, 413, "invalid_request_error", "request_too_large")
        assert harness.mock.requests == []
