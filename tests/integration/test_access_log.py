"""The access log of a real `tollgate serve` (real Redis, the mock upstream as a process): one
JSON line on stdout per request with the request's id, no key, hash or token anywhere in the
whole log; the startup line and the unknown-variable warning; the same with two workers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.keys import hash_key
from tests.integration.conftest import MESSAGES, Mock
from tests.servers import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    ProxyServer,
    RedisServer,
    proxy_server,
    tollgate_env,
    wait_for,
)

HELLO = {"model": "gpt-4o-mini", "messages": MESSAGES}
WARNING = (
    "TOLLGATE_REDIS_ULR is not a Tollgate setting and is ignored; did you mean TOLLGATE_REDIS_URL?"
)


def access_lines(proxy: ProxyServer) -> list[dict[str, Any]]:
    """Every access line of the whole log so far, but the readiness probes' (GET /healthz)."""
    found = []
    for line in proxy.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["path"] != "/healthz":
                found.append(record)
    return found


def lines_for(proxy: ProxyServer, count: int) -> list[dict[str, Any]]:
    """The access lines once `count` have been written (a line follows its answer at once)."""
    wait_for(lambda: len(access_lines(proxy)) >= count, timeout_s=10, what=f"{count} lines")
    return access_lines(proxy)


@pytest.fixture
def proxy(redis_store: RedisServer, mock: Mock, tmp_path: Path) -> Iterator[ProxyServer]:
    env = tollgate_env(
        redis_url=redis_store.url,
        upstream_url=mock.url,
        spool_dir=tmp_path / "spool",
        log_level="info",
        TOLLGATE_REDIS_ULR=redis_store.url,
    )
    with proxy_server(env=env) as server:
        yield server


def test_every_request_is_one_line_with_its_id_and_no_secret_is_ever_logged(
    proxy: ProxyServer, mock: Mock
) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    answers: list[httpx.Response] = []
    secrets: list[str] = []
    with httpx.Client(base_url=proxy.url, timeout=20) as client:

        def create(**fields: Any) -> dict[str, Any]:
            answers.append(
                client.post("/admin/keys", json={"name": "log", **fields}, headers=admin)
            )
            assert answers[-1].status_code == 201
            record: dict[str, Any] = answers[-1].json()
            secrets.append(record["key"])
            return record

        plain, limited = create(), create(name="limited", rpm=1)
        as_plain = {"authorization": f"Bearer {plain['key']}"}
        as_limited = {"authorization": f"Bearer {limited['key']}"}
        answers.append(client.post("/v1/chat/completions", json=HELLO, headers=as_plain))
        answers.append(
            client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=as_plain)
        )
        answers.append(client.post("/v1/chat/completions", json=HELLO, headers=as_limited))
        answers.append(client.post("/v1/chat/completions", json=HELLO, headers=as_limited))
        answers.append(client.post("/v1/chat/completions", json={"model": "x"}, headers=as_plain))
        answers.append(client.get("/v1/models", headers=as_plain))
        answers.append(client.get("/v1/no-such-thing", headers=as_plain))
        answers.append(client.get(f"/admin/keys/{plain['id']}", headers=admin))
        answers.append(client.get("/admin/keys", headers=as_plain))  # a key is no admin token
        answers.append(
            client.post(
                "/v1/chat/completions", json=HELLO, headers={"authorization": "Bearer sk-tg-nope"}
            )
        )
        mock.fault(status=500, count=1)
        try:
            answers.append(client.post("/v1/chat/completions", json=HELLO, headers=as_plain))
        finally:
            mock.clear_fault()
        rotated = client.post(f"/admin/keys/{plain['id']}/rotate", json={}, headers=admin)
        answers.append(rotated)
        secrets.append(rotated.json()["key"])
    statuses = [a.status_code for a in answers]
    assert statuses == [201, 201, 200, 200, 200, 429, 400, 200, 404, 200, 401, 401, 502, 200]

    lines = lines_for(proxy, len(answers))
    assert [line["request_id"] for line in lines] == [a.headers["x-request-id"] for a in answers]
    assert [line["status"] for line in lines] == statuses
    assert [line["error"] for line in lines] == [
        None, None, None, None, None, "rate_limit_error", "invalid_request_error", None,
        "invalid_request_error", None, "authentication_error", "authentication_error",
        "upstream_error", None,
    ]  # fmt: skip
    chat, stream, limited_ok, refused = lines[2:6]
    assert (chat["key_id"], chat["model"], chat["upstream"], chat["stream"]) == (
        plain["id"], "gpt-4o-mini", "default", False,
    )  # fmt: skip
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0 and chat["cost_usd"] > 0
    assert stream["stream"] is True and stream["completion_tokens"] > 0
    assert (limited_ok["key_name"], refused["key_name"], refused["key_id"]) == (
        "limited", "limited", limited["id"],
    )  # fmt: skip
    assert lines[12]["key_id"] == plain["id"] and lines[12]["attempts"] == 1

    log = proxy.output()
    assert "tollgate starting (pid " in log
    for secret in (*secrets, *map(hash_key, secrets), ADMIN_TOKEN, UPSTREAM_KEY):
        assert secret not in log


def test_a_stream_the_client_abandons_is_a_499_line_with_its_usage_records_figures(
    proxy: ProxyServer, mock: Mock
) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        created = client.post(
            "/admin/keys",
            json={"name": "leaver"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()
        body = {"model": "mock-gated", "messages": MESSAGES, "stream": True}
        headers = {"authorization": f"Bearer {created['key']}"}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer:
            request_id = answer.headers["x-request-id"]
            next(answer.iter_lines())  # the first event; the gate holds the rest back
    _, line = lines_for(proxy, 2)
    assert (line["request_id"], line["status"], line["error"]) == (request_id, 499, "client_closed")
    assert (line["key_id"], line["stream"], line["upstream"]) == (created["id"], True, "default")
    assert line["prompt_tokens"] >= 1 and line["ttft_ms"] is not None
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="the upstream stream closed")


def test_heads_refused_before_the_app_are_lines_too(proxy: ProxyServer) -> None:
    """A head over the limits (431) and bytes that are no HTTP request (400) are answered by
    the connection, not the app: they are logged all the same."""
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        too_many = client.get("/v1/models", headers={f"x-h{i}": "v" for i in range(150)})
    assert too_many.status_code == 431
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        answer = b""
        for _ in range(100):  # until the server closes
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 400 ")
    refused, garbage = lines_for(proxy, 2)
    assert (refused["request_id"], refused["method"], refused["path"]) == (
        too_many.headers["x-request-id"], "GET", "/v1/models",
    )  # fmt: skip
    assert (refused["status"], refused["error"], refused["key_id"]) == (
        431, "invalid_request_error", None,
    )  # fmt: skip
    assert (garbage["status"], garbage["error"], garbage["method"], garbage["path"]) == (
        400, "invalid_request_error", None, None,
    )  # fmt: skip
    assert len(garbage["request_id"]) == 32


def test_the_startup_line_and_the_unknown_variable_warning(
    proxy: ProxyServer, redis_store: RedisServer, mock: Mock
) -> None:
    log = proxy.output()
    (startup,) = [line for line in log.splitlines() if "tollgate starting (pid " in line]
    upstream_host = mock.url.removeprefix("http://").removesuffix("/v1")
    assert " INFO tollgate: " in startup
    assert startup.endswith(
        f"upstreams default ({upstream_host}); store redis 127.0.0.1:{redis_store.port}; "
        "fail mode closed; workers 1; admin API on at /admin; access log json"
    ), startup
    (warning,) = [line for line in log.splitlines() if "TOLLGATE_REDIS_ULR" in line]
    assert warning.endswith(" WARNING tollgate: " + WARNING), warning


def test_each_worker_logs_its_startup_line_and_its_requests(
    redis_store: RedisServer, mock: Mock, tmp_path: Path
) -> None:
    env = tollgate_env(
        redis_url=redis_store.url,
        upstream_url=mock.url,
        spool_dir=tmp_path / "spool",
        log_level="info",
        TOLLGATE_ACCESS_LOG="json",
        TOLLGATE_REDIS_ULR="x",
    )
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]
    with proxy_server(env=env, args=args) as proxy, httpx.Client(base_url=proxy.url) as client:
        # Both workers have started once each has said so.
        wait_for(
            lambda: proxy.output().count("tollgate starting (pid ") == 2,
            timeout_s=20,
            what="two startup lines",
        )
        ids = [client.get("/v1/models").headers["x-request-id"] for _ in range(20)]
        lines = lines_for(proxy, len(ids))
        log = proxy.output()
    assert sorted(line["request_id"] for line in lines) == sorted(ids)
    assert {(line["status"], line["error"]) for line in lines} == {(401, "authentication_error")}
    assert log.count(WARNING) == 2
    assert log.count("workers 2; admin API on at /admin") == 2
