"""The client-facing HTTP API of SPEC §3: auth, paths, headers, pass-through, upstream failures,
models, other /v1 paths, health and metrics, and bad input that must never become a 500."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.config import Settings
from proxy.store import Store, embedded_client
from tests.conftest import ADMIN_TOKEN, Harness

HarnessFactory = Callable[..., AbstractContextManager[Harness]]
CHAT_ALIASES = [
    "/v1/chat/completions",
    "/chat/completions",
    "/api/chat/completions",
    "/api/v1/chat/completions",
    "/api/ai/chat/completions",
]
HELLO: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def key(harness: Harness) -> str:
    secret: str = harness.create_key(name="endpoints")["key"]
    return secret


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_error(
    response: httpx.Response, status: int, error_type: str, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["code"] == code
    assert error["message"]
    return error


def assert_auth_failed(response: httpx.Response) -> None:
    assert_error(response, 401, "authentication_error", "invalid_api_key")
    assert response.headers["x-should-retry"] == "false"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def app_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> Iterator[TestClient]:
    """The app on its own store, with a given upstream transport (None: the real one)."""
    app = create_app(settings, store=Store(embedded_client()), transport=transport)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def new_key(client: TestClient, **fields: Any) -> str:
    response = client.post("/admin/keys", json={"name": "custom", **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    secret: str = response.json()["key"]
    return secret


def completion(usage: bool = True) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        ],
    }
    if usage:
        answer["usage"] = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    return answer


def key_usage(harness: Harness, key_id: str) -> dict[str, Any]:
    response = harness.admin("GET", f"/admin/keys/{key_id}/usage?group_by=model")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def exported(harness: Harness) -> list[dict[str, Any]]:
    response = harness.admin("GET", "/admin/usage/export")
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


# --- authentication ----------------------------------------------------------------------------


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


# --- paths -------------------------------------------------------------------------------------


# --- request ids -------------------------------------------------------------------------------


# --- what goes upstream and what comes back ----------------------------------------------------


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


# --- upstream failures -------------------------------------------------------------------------


# --- models ------------------------------------------------------------------------------------


# --- other /v1 paths ---------------------------------------------------------------------------


# --- health and metrics ------------------------------------------------------------------------


# --- bad input never becomes a 500 -------------------------------------------------------------
