from __future__ import annotations

from tests.conftest import Harness


def test_chat_completion_through_the_proxy_returns_the_upstream_answer(harness: Harness) -> None:
    key = harness.create_key()["key"]
    response = harness.chat(key)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] > 0
    assert harness.mock.requests[0]["headers"]["authorization"] == "Bearer sk-upstream-secret"
