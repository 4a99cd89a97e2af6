"""Attacks a client could make on what it reaches and what it is billed, on a real server.

Raw sockets send request targets exactly as written (a client library would normalise `..`
and percent-escapes); every test checks what reached the mock upstream, not only the answer.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id
from tests.servers import wait_for

MODEL = "gpt-4o-mini"


def raw_request(
    url: str,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout_s: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the target as written; returns status, headers and body."""
    parts = urlsplit(url)
    head = [f"{method} {target} HTTP/1.1", f"host: {parts.netloc}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        head.append(f"content-length: {len(body)}")
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, payload = rest.partition(b"\r\n\r\n")
    fields = {}
    for line in raw_headers.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, payload


def received_since(mock: Mock, before: int) -> list[dict[str, Any]]:
    return mock.received()[before:]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/%2e%2e/%2e%2e/tenant-b/v1/files"),
        ("GET", "/v1/../admin/keys"),
        ("GET", "/v1/../../admin/keys"),
        ("POST", "/v1/foo%3Finjected=1"),
        ("POST", "/v1/chat%2fcompletions"),
        ("POST", "/v1/./chat/completions"),
        ("POST", "/v1/%2E/chat/completions"),
        ("POST", "/api/v1/../v1/chat/completions"),
        ("GET", "/v1/models/..%2f..%2fadmin"),
        ("POST", "/v1//chat/completions"),
        ("POST", "/v1/chat\\completions"),
    ],
)
def test_request_targets_that_leave_the_route_are_400_and_never_reach_upstream(
    stack: Stack, mock: Mock, key: dict[str, Any], method: str, target: str
) -> None:
    before = len(mock.received())
    body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    status, headers, payload = raw_request(
        stack.url,
        method,
        target,
        headers={"authorization": f"Bearer {key['key']}", "content-type": "application/json"},
        body=body if method == "POST" else b"",
    )
    assert status == 400, payload
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"]
    assert received_since(mock, before) == []


def test_dot_segment_chat_path_cannot_skip_validation_or_reservation(
    stack: Stack, mock: Mock, since: float
) -> None:
    record = stack.admin.create_key(name="dot-segment", credits=0.0017)
    before = len(mock.received())
    prompt = "x" * 20_000  # small enough to be sent whole before the 400 comes back
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
    status, _, _ = raw_request(
        stack.url,
        "POST",
        "/v1/./chat/completions",
        headers={"authorization": f"Bearer {record['key']}", "content-type": "application/json"},
        body=body.encode(),
    )
    assert status == 400
    assert received_since(mock, before) == []
    assert stack.admin.key(record["id"])["credits"] == pytest.approx(0.0017)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("DELETE", "/v1/files/file-abc123"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/organization/users"),
        ("GET", "/v1/assistants"),
        ("GET", "/api/v1/files"),
        ("POST", "/v1/chat/completions/"),
    ],
)
def test_operator_only_upstream_paths_are_404_for_a_client_key(
    client: httpx.Client, mock: Mock, method: str, path: str
) -> None:
    before = len(mock.received())
    response = client.request(method, path, json={"purpose": "batch"} if method == "POST" else None)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert "location" not in response.headers
    assert received_since(mock, before) == []


def test_trailing_slash_is_never_redirected_to_the_clients_host(
    stack: Stack, key: dict[str, Any], mock: Mock
) -> None:
    before = len(mock.received())
    status, headers, _ = raw_request(
        stack.url,
        "POST",
        "/v1/chat/completions/",
        headers={"authorization": f"Bearer {key['key']}", "host": "evil.example"},
        body=json.dumps({"model": MODEL, "messages": MESSAGES}).encode(),
    )
    assert status == 404
    assert "location" not in headers
    assert received_since(mock, before) == []


def test_reused_request_id_cannot_skip_settlement(stack: Stack, mock: Mock, since: float) -> None:
    record = stack.admin.create_key(name="reused-id", credits=5)
    answers = []
    with httpx.Client(
        base_url=stack.url, headers={"authorization": f"Bearer {record['key']}"}, timeout=20
    ) as client:
        for _ in range(4):
            answers.append(
                client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": MESSAGES},
                    headers={"x-request-id": "reuse-me-1"},
                )
            )
    assert [a.status_code for a in answers] == [200] * 4
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == 4 and "reuse-me-1" not in ids
    assert {a.headers["x-client-request-id"] for a in answers} == {"reuse-me-1"}
    records = [stack.admin.record(request_id, since=since) for request_id in ids]
    assert {r["client_request_id"] for r in records} == {"reuse-me-1"}
    key = stack.admin.key(record["id"])
    assert key["reserved_credits"] == 0
    assert key["credits"] == pytest.approx(5 - sum(r["cost_usd"] for r in records), abs=1e-6)


def test_one_shared_request_id_cannot_pass_the_concurrency_limit(stack: Stack, mock: Mock) -> None:
    record = stack.admin.create_key(name="shared-id-streams", max_concurrency=2)
    mock.client.post("/_mock/reset").raise_for_status()  # max_open_streams from here on

    def stream() -> int:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            response = client.post(
                "/v1/chat/completions",
                json={"model": "mock-slow", "messages": MESSAGES, "stream": True},
                headers={"authorization": f"Bearer {record['key']}", "x-request-id": "shared"},
            )
            return response.status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: stream(), range(20)))
    assert statuses.count(200) >= 2
    assert statuses.count(200) + statuses.count(429) == 20
    upstream = [r for r in mock.received() if r["path"] == "/v1/chat/completions"]
    assert len(upstream) == statuses.count(200)
    assert mock.state()["max_open_streams"] <= 2


def test_client_organisation_and_forwarding_headers_stay_here(
    client: httpx.Client, mock: Mock
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={
            "openai-organization": "org-of-the-client",
            "openai-project": "proj-of-the-client",
            "x-forwarded-for": "10.9.8.7",
            "x-real-ip": "10.9.8.7",
            "x-custom": "anything",
        },
    )
    assert response.status_code == 200
    upstream = mock.request_with_id(response.headers["x-request-id"])["headers"]
    for name in ("openai-organization", "openai-project", "x-forwarded-for", "x-real-ip"):
        assert name not in upstream, name
    assert "x-custom" not in upstream


def test_huge_model_names_are_400_and_do_not_grow_redis(
    stack: Stack, key: dict[str, Any], mock: Mock
) -> None:
    def used_memory() -> int:
        info = stack.redis.cli("info", "memory")
        return int(next(x for x in info.splitlines() if x.startswith("used_memory:")).split(":")[1])

    before_memory = used_memory()
    before = len(mock.received())
    with httpx.Client(
        base_url=stack.url, headers={"authorization": f"Bearer {key['key']}"}, timeout=30
    ) as client:
        for path, body in (
            ("/v1/chat/completions", {"messages": MESSAGES}),
            ("/v1/embeddings", {"input": "x"}),
            ("/v1/responses", {"input": "x"}),
        ):
            for _ in range(5):
                response = client.post(path, json={**body, "model": "m" * 1_000_000})
                assert response.status_code == 400, response.text
                assert response.json()["error"]["param"] == "model"
    assert received_since(mock, before) == []
    assert used_memory() - before_memory < 1_000_000


def test_non_streaming_client_that_leaves_is_settled_499_at_once(
    stack: Stack, key: dict[str, Any], mock: Mock, since: float
) -> None:
    client_id = new_request_id()
    body = json.dumps({"model": "mock-hang", "messages": MESSAGES}).encode()
    parts = urlsplit(stack.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\n"
            f"host: {parts.netloc}\r\nauthorization: Bearer {key['key']}\r\n"
            f"x-client-request-id: {client_id}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        wait_for(
            lambda: any(
                r["headers"].get("x-client-request-id") == client_id for r in mock.received()
            ),
            what="the request upstream",
        )
    left = time.time()
    record = stack.admin.record(client_id, since=since, timeout_s=10)
    assert record["status"] == 499
    assert record["latency_ms"] < 10_000
    assert time.time() - left < 10
    assert stack.admin.key(key["id"])["reserved_credits"] == 0
