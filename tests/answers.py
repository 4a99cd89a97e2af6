"""OpenAI-style answers in unit tests: checks of the error answers Tollgate gives its clients,
and a chat completion as an upstream would send it."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(
    response: httpx.Response, status: int, error_type: str, code: str | None = None
) -> dict[str, Any]:
    """The response is Tollgate's JSON error of this status, type and code; returns the error."""
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
