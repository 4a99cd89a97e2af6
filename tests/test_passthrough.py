"""Metered pass-through (the operator's allowlist of other /v1 paths) and the surfaces' shared
handling: bodies forwarded as sent, usage metered, everything unlisted a 404."""

from __future__ import annotations

import httpx
import pytest

from proxy.config import Settings
from tests.answers import assert_auth_failed, assert_error
from tests.conftest import HELLO, Harness, HarnessFactory, bearer


def test_embeddings_pass_through_and_are_metered(harness: Harness) -> None:
    record = harness.create_key()
    body = {"model": "text-embedding-3-small", "input": "The quick brown fox jumps"}
    response = harness.client.post("/v1/embeddings", json=body, headers=bearer(record["key"]))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    upstream = harness.mock.requests[-1]
    assert upstream["path"] == "/v1/embeddings"
    assert upstream["body"] == body
    assert upstream["headers"]["authorization"] == "Bearer sk-upstream-secret"

    usage = harness.key_usage(record["id"])
    tokens = answer["usage"]["prompt_tokens"]
    [group] = usage["groups"]
    assert group["model"] == "text-embedding-3-small"
    assert group["requests"] == 1
    assert group["prompt_tokens"] == tokens
    assert group["completion_tokens"] == 0
    [usage_record] = harness.export()
    assert usage_record["request_id"] == response.headers["x-request-id"]
    assert usage_record["path"] == "/v1/embeddings"
    assert usage_record["usage_source"] == "upstream"


def test_passthrough_needs_a_valid_key(harness: Harness) -> None:
    response = harness.client.post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert_auth_failed(response)
    assert harness.mock.requests == []


def test_passthrough_keeps_the_query_string(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    with harness_factory(
        settings, upstream=httpx.MockTransport(handler), passthrough_paths=("/v1/files",)
    ) as harness:
        key = harness.create_key()["key"]
        response = harness.client.get("/v1/files?purpose=batch&limit=2", headers=bearer(key))
        assert response.status_code == 200
        assert response.json() == {"object": "list", "data": []}
        assert str(seen[-1].url) == "http://upstream.test/v1/files?purpose=batch&limit=2"
        assert seen[-1].headers["authorization"] == "Bearer sk-upstream-secret"


def test_unlisted_v1_paths_are_404_without_an_upstream_call(harness: Harness, key: str) -> None:
    attempts = [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("DELETE", "/v1/files/file-abc"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/organization/users"),
        ("GET", "/v1/assistants"),
        ("GET", "/api/v1/files"),
        ("POST", "/v1/chat/completions/"),
        ("GET", "/v1/embeddings"),
    ]
    for method, path in attempts:
        response = harness.client.request(method, path, headers=bearer(key))
        assert_error(response, 404, "invalid_request_error", "not_found")
        assert "location" not in response.headers
    assert harness.mock.requests == []


def test_listed_passthrough_paths_reach_the_upstream_and_nothing_else(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/models":  # Tollgate's own list fetch at startup
            seen.append(request)
        return httpx.Response(200, json={"id": "modr-1", "results": []})

    listed = ("/v1/moderations", "/v1/audio/*")
    with harness_factory(
        settings, upstream=httpx.MockTransport(handler), passthrough_paths=listed
    ) as harness:
        key = harness.create_key()["key"]
        for path in ("/v1/moderations", "/api/v1/moderations", "/v1/audio/speech"):
            response = harness.client.post(path, json={"input": "x"}, headers=bearer(key))
            assert response.status_code == 200, (path, response.text)
        for path in ("/v1/moderations/x", "/v1/audio", "/v1/audiox/speech", "/v1/files"):
            response = harness.client.post(path, json={"input": "x"}, headers=bearer(key))
            assert response.status_code == 404, path
    assert [r.url.path for r in seen] == [
        "/v1/moderations",
        "/v1/moderations",
        "/v1/audio/speech",
    ]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/completions", "/v1/responses"])
def test_model_over_256_characters_is_400_on_every_surface(
    harness: Harness, key: str, path: str
) -> None:
    body = {"model": "m" * 257, "input": "x", "prompt": "x"}
    response = harness.client.post(path, json=body, headers=bearer(key))
    error = assert_error(response, 400, "invalid_request_error")
    assert error["param"] == "model"
    chat = harness.chat(key, {**HELLO, "model": "m" * 257})
    assert assert_error(chat, 400, "invalid_request_error")["param"] == "model"
    assert harness.mock.requests == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"[" * 100_000, id="deep"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b'{"model": "\\ud800", "input": "x"}', id="lone-surrogate-model"),
        pytest.param(b'{"model": 42, "input": "x"}', id="number-model"),
        pytest.param(b'{"usage": {"prompt_tokens": "x"}}', id="odd-usage"),
    ],
)
def test_odd_passthrough_bodies_are_forwarded_as_sent(
    harness_factory: HarnessFactory, settings: Settings, content: bytes
) -> None:
    seen: list[bytes] = []
    refusal = b'{"error": {"message": "bad input", "type": "invalid_request_error"}}'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/models":  # Tollgate's own list fetch at startup
            seen.append(request.content)
        return httpx.Response(400, content=refusal, headers={"content-type": "application/json"})

    listed = ("/v1/moderations",)
    with harness_factory(
        settings, upstream=httpx.MockTransport(handler), passthrough_paths=listed
    ) as harness:
        key = harness.create_key()["key"]
        response = harness.client.post("/v1/moderations", content=content, headers=bearer(key))
        assert response.status_code == 400, response.text
        assert response.content == refusal
        assert seen == [content]
