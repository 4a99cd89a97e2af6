"""The application around the handlers: its routes (chat aliases, unknown paths and methods,
health), the request-id middleware and the handler that turns any other failure into a 500."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from proxy.config import Settings
from tests.answers import assert_auth_failed, assert_error
from tests.conftest import HELLO, Harness, HarnessFactory, bearer

CHAT_ALIASES = [
    "/v1/chat/completions",
    "/chat/completions",
    "/api/chat/completions",
    "/api/v1/chat/completions",
    "/api/ai/chat/completions",
]
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize("path", CHAT_ALIASES)
def test_every_chat_alias_answers_like_v1(harness: Harness, key: str, path: str) -> None:
    response = harness.client.post(path, json=HELLO, headers=bearer(key))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["total_tokens"] > 0
    assert harness.mock.requests[-1]["path"] == "/v1/chat/completions"
    assert harness.mock.requests[-1]["body"] == HELLO

    invalid = harness.client.post(path, json={**HELLO, "messages": []}, headers=bearer(key))
    reference = harness.client.post(
        "/v1/chat/completions", json={**HELLO, "messages": []}, headers=bearer(key)
    )
    assert invalid.status_code == reference.status_code == 400
    assert invalid.json() == reference.json()
    assert_auth_failed(harness.client.post(path, json=HELLO))
    assert len(harness.mock.requests) == 1


@pytest.mark.parametrize("path", CHAT_ALIASES)
def test_every_chat_alias_streams(harness: Harness, key: str, path: str) -> None:
    response = harness.client.post(path, json={**HELLO, "stream": True}, headers=bearer(key))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/v2/chat/completions"),
        ("POST", "/api/v2/chat/completions"),
        ("GET", "/healthz/extra"),
    ],
)
def test_unknown_path_is_404_json(harness: Harness, key: str, method: str, path: str) -> None:
    response = harness.client.request(method, path, headers=bearer(key), json=HELLO)
    assert_error(response, 404, "invalid_request_error", "not_found")
    assert harness.mock.requests == []


def test_wrong_method_is_405_json(harness: Harness) -> None:
    response = harness.client.post("/healthz")
    assert_error(response, 405, "invalid_request_error", "method_not_allowed")


def test_client_request_id_is_kept_beside_tollgates_own(harness: Harness, key: str) -> None:
    response = harness.chat(key, HELLO, headers={"x-request-id": "client-req.42:abc"})
    assert response.status_code == 200
    generated = response.headers.get_list("x-request-id")
    assert len(generated) == 1 and GENERATED_ID.match(generated[0])
    assert response.headers.get_list("x-client-request-id") == ["client-req.42:abc"]
    upstream = harness.mock.requests[-1]["headers"]
    assert upstream["x-request-id"] == generated[0]
    assert upstream["x-client-request-id"] == "client-req.42:abc"


def test_x_client_request_id_wins_over_x_request_id(harness: Harness, key: str) -> None:
    headers = {"x-request-id": "second", "x-client-request-id": "sdk-id-1"}
    response = harness.chat(key, HELLO, headers=headers)
    assert response.headers["x-client-request-id"] == "sdk-id-1"
    assert response.headers["x-request-id"] not in ("second", "sdk-id-1")


def test_request_id_generated_when_not_sent(harness: Harness, key: str) -> None:
    first = harness.chat(key, HELLO)
    second = harness.chat(key, HELLO)
    assert GENERATED_ID.match(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert "x-client-request-id" not in second.headers
    upstream = harness.mock.requests[-1]["headers"]
    assert upstream["x-request-id"] == second.headers["x-request-id"]
    assert "x-client-request-id" not in upstream


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "semi;colon", "\u00e9t\u00e9"])
def test_insane_client_request_id_is_dropped(harness: Harness, key: str, sent: str) -> None:
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"x-request-id", sent.encode("latin-1")),
        (b"x-client-request-id", sent.encode("latin-1")),
    ]
    response = harness.client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert GENERATED_ID.match(generated)
    assert "x-client-request-id" not in response.headers
    upstream = harness.mock.requests[-1]["headers"]
    assert upstream["x-request-id"] == generated
    assert "x-client-request-id" not in upstream


def test_reused_client_request_id_never_shares_a_settlement(harness: Harness) -> None:
    record = harness.create_key(credits=5)
    for _ in range(4):
        response = harness.chat(record["key"], HELLO, headers={"x-request-id": "reuse-me-1"})
        assert response.status_code == 200
    records = harness.export()
    assert len(records) == 4
    assert len({r["request_id"] for r in records}) == 4
    assert {r["client_request_id"] for r in records} == {"reuse-me-1"}
    after = harness.admin("GET", f"/admin/keys/{record['id']}").json()
    assert after["reserved_credits"] == 0
    assert after["credits"] == pytest.approx(5 - sum(r["cost_usd"] for r in records))


def test_request_id_is_on_every_error(harness: Harness, key: str) -> None:
    answers: list[Any] = [
        harness.client.post("/v1/chat/completions", json=HELLO),
        harness.chat(key, {"model": ""}),
        harness.client.get("/nowhere"),
        harness.client.post("/healthz"),
        harness.chat(key, {**HELLO, "model": "mock-error"}),
        harness.admin("GET", "/admin/keys/0123456789abcdef"),
    ]
    for response in answers:
        assert response.status_code >= 400
        assert GENERATED_ID.match(response.headers["x-request-id"]), response.status_code
    sent = harness.client.post(
        "/v1/chat/completions", json=HELLO, headers={"x-request-id": "mine-1"}
    )
    assert sent.status_code == 401
    assert GENERATED_ID.match(sent.headers["x-request-id"])
    assert sent.headers["x-client-request-id"] == "mine-1"


def test_unexpected_failure_is_a_500_without_internals_and_with_request_id(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("internal detail: /etc/tollgate/secret.toml")

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        key = harness.create_key()["key"]
        response = harness.client.post(
            "/v1/chat/completions", json=HELLO, headers={**bearer(key), "x-request-id": "r-500"}
        )
        error = assert_error(response, 500, "server_error")
        assert "secret" not in response.text
        assert "RuntimeError" not in response.text
        assert error["message"] == "The server had an error while processing your request"
        assert GENERATED_ID.match(response.headers["x-request-id"])
        assert response.headers["x-client-request-id"] == "r-500"


def test_usage_record_carries_the_response_request_id(harness: Harness) -> None:
    record = harness.create_key()
    response = harness.chat(record["key"], HELLO, headers={"x-request-id": "trace-7"})
    assert response.status_code == 200
    generated = harness.chat(record["key"], HELLO)
    records = harness.export()
    assert [r["request_id"] for r in records] == [
        response.headers["x-request-id"],
        generated.headers["x-request-id"],
    ]
    assert [r["client_request_id"] for r in records] == ["trace-7", None]


def test_healthz_readyz_and_metrics_answer(harness: Harness, key: str) -> None:
    assert harness.chat(key, HELLO).status_code == 200
    health = harness.client.get("/healthz")
    assert health.status_code == 200
    assert health.headers["x-request-id"]
    assert harness.client.get("/readyz").status_code == 200
    assert harness.client.get("/readyz/store").status_code == 200
    metrics = harness.client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "tollgate_requests_total" in metrics.text
    assert re.search(
        r'^tollgate_requests_total\{[^}]*model="gpt-4o-mini"[^}]*status="200"[^}]*\} 1\.0$',
        metrics.text,
        re.MULTILINE,
    ), metrics.text
