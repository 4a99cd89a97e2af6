"""The access log (SPEC §6): one line on stdout per request, success or refusal, metered or
not, with the fields of its usage record and the error type of a failure; text and off."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import httpx
import pytest

from proxy.access_log import FIELDS
from proxy.config import Settings
from proxy.keys import hash_key
from proxy.mock_upstream import Fault
from tests.conftest import HELLO, Harness, HarnessFactory, bearer
from tests.servers import ADMIN_TOKEN

CaptureFixture = pytest.CaptureFixture[str]
# What only a request of a key has: null on every other line.
METERED_FIELDS = (
    "key_id", "key_name", "model", "upstream", "attempts", "stream", "prompt_tokens",
    "completion_tokens", "cost_usd", "ttft_ms",
)  # fmt: skip


def lines(capsys: CaptureFixture) -> list[dict[str, Any]]:
    """The access lines written since the last call, parsed (each one JSON object)."""
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def one_line(capsys: CaptureFixture) -> dict[str, Any]:
    found = lines(capsys)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def fresh(harness: Harness, capsys: CaptureFixture) -> dict[str, Any]:
    """A key without limits, its creation's line read away."""
    record = harness.create_key(name="alice")
    capsys.readouterr()
    return record


def test_a_chat_completion_is_one_line_with_its_usage_records_figures(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    answer = harness.chat(fresh["key"])
    assert answer.status_code == 200
    line = one_line(capsys)
    assert tuple(line) == FIELDS
    (record,) = harness.export()
    assert line["request_id"] == answer.headers["x-request-id"] == record["request_id"]
    assert {k: line[k] for k in ("method", "path", "status", "error")} == {
        "method": "POST", "path": "/v1/chat/completions", "status": 200, "error": None,
    }  # fmt: skip
    for name in (
        "key_id", "key_name", "model", "stream", "prompt_tokens", "completion_tokens",
        "cost_usd", "ttft_ms", "upstream", "attempts",
    ):  # fmt: skip
        assert line[name] == record[name], name
    assert (line["key_id"], line["key_name"], line["upstream"], line["attempts"]) == (
        fresh["id"], "alice", "default", 1,
    )  # fmt: skip
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0 and line["cost_usd"] > 0
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    assert datetime.fromisoformat(line["ts"]).utcoffset() is not None
    assert line["ts"][:10] == record["ts"][:10]


def test_a_stream_is_one_line_marked_stream(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    answer = harness.chat(fresh["key"], {**HELLO, "stream": True})
    assert answer.status_code == 200 and "data:" in answer.text
    line = one_line(capsys)
    (record,) = harness.export()
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["stream"], line["status"], line["error"]) == (True, 200, None)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        record["prompt_tokens"], record["completion_tokens"],
    )  # fmt: skip
    assert line["completion_tokens"] > 0 and line["ttft_ms"] is not None


def test_an_upstream_500_becomes_a_502_line_with_the_upstream_error_type(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    harness.mock.fault = Fault(status=500)
    answer = harness.chat(fresh["key"])
    assert answer.status_code == 502
    line = one_line(capsys)
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["status"], line["error"]) == (502, "upstream_error")
    assert (line["key_id"], line["upstream"], line["attempts"]) == (fresh["id"], "default", 1)
    assert (line["prompt_tokens"], line["completion_tokens"], line["cost_usd"]) == (0, 0, 0)


def test_an_upstream_4xx_passed_back_names_the_upstreams_error_type(
    harness_factory: HarnessFactory, settings: Settings, capsys: CaptureFixture
) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        if b"plain" in request.content:
            return httpx.Response(422, text="unprocessable")
        if b"hostile" in request.content:  # a type that would break the line is not shown
            return httpx.Response(400, json={"error": {"type": 'x","status":200}\n'}})
        return httpx.Response(400, json={"error": {"type": "context_length_exceeded"}})

    with harness_factory(settings, upstream=httpx.MockTransport(upstream)) as harness:
        key = harness.create_key()["key"]
        capsys.readouterr()
        assert harness.chat(key).status_code == 400
        assert harness.chat(key, {**HELLO, "user": "plain"}).status_code == 422
        assert harness.chat(key, {**HELLO, "user": "hostile"}).status_code == 400
        found = lines(capsys)
    assert [(x["status"], x["error"]) for x in found] == [
        (400, "context_length_exceeded"), (422, "upstream_error"), (400, "upstream_error"),
    ]  # fmt: skip


def test_what_clients_and_operators_choose_is_escaped_so_each_line_stays_one_json_object(
    harness: Harness, capsys: CaptureFixture
) -> None:
    name = 'ops "team"\n{\u2028}'
    key = harness.create_key(name=name)["key"]
    model = 'gpt-4o-mini"\n,"status":500 \\ é\u2028'
    capsys.readouterr()
    answers = [
        harness.client.post(
            "/v1/chat/completions",
            content=json.dumps({**HELLO, "model": model}),
            headers=bearer(key),
        ),
        harness.client.get("/v1/x%22y%0A%E2%80%A8z", headers=bearer(key)),
    ]
    out = capsys.readouterr().out
    assert out.isascii() and out.count("\n") == 2, out  # no line separator of any kind inside
    found = [json.loads(line) for line in out.split("\n")[:2]]
    assert [x["request_id"] for x in found] == [a.headers["x-request-id"] for a in answers]
    assert (found[0]["key_name"], found[0]["model"], found[0]["status"]) == (name, model, 200)
    assert (found[1]["path"], found[1]["status"]) == ('/v1/x"y\n\u2028z', 404)


def test_a_rate_limited_request_names_its_key_and_model_but_no_upstream(
    harness: Harness, capsys: CaptureFixture
) -> None:
    created = harness.create_key(name="bob", rpm=1)
    assert harness.chat(created["key"]).status_code == 200
    capsys.readouterr()
    answer = harness.chat(created["key"])
    assert answer.status_code == 429
    line = one_line(capsys)
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["status"], line["error"]) == (429, "rate_limit_error")
    assert (line["key_id"], line["key_name"], line["model"]) == (
        created["id"],
        "bob",
        HELLO["model"],
    )
    assert (line["upstream"], line["attempts"], line["prompt_tokens"]) == (None, None, None)


def test_an_insufficient_credits_refusal_is_a_402_line(
    harness: Harness, capsys: CaptureFixture
) -> None:
    created = harness.create_key(name="poor", credits=0)
    capsys.readouterr()
    assert harness.chat(created["key"]).status_code == 402
    line = one_line(capsys)
    assert (line["status"], line["error"], line["key_id"]) == (
        402, "insufficient_credits", created["id"],
    )  # fmt: skip


def test_an_unknown_key_is_a_401_line_without_key_fields(
    harness: Harness, capsys: CaptureFixture
) -> None:
    answer = harness.chat("sk-tg-0123456789abcdef_" + "x" * 43)
    assert answer.status_code == 401
    line = one_line(capsys)
    assert (line["status"], line["error"]) == (401, "authentication_error")
    assert (line["key_id"], line["key_name"], line["model"]) == (None, None, None)


def test_an_invalid_body_is_a_400_line(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    answer = harness.chat(fresh["key"], {"model": "gpt-4o-mini"})  # no messages
    assert answer.status_code == 400
    line = one_line(capsys)
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["status"], line["error"], line["key_id"]) == (400, "invalid_request_error", None)


def test_a_client_that_leaves_while_sending_its_body_is_a_499_line(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    parts: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"model": "gpt-4o-mini", ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "headers": [(b"authorization", f"Bearer {fresh['key']}".encode()),
                    (b"content-type", b"application/json")],
    }  # fmt: skip
    harness.run(harness.client.app, scope, receive, send)
    assert sent[0]["status"] == 499
    line = one_line(capsys)
    assert (line["status"], line["error"], line["path"]) == (
        499, "client_closed", "/v1/chat/completions",
    )  # fmt: skip
    assert dict(sent[0]["headers"])[b"x-request-id"].decode() == line["request_id"]


def test_unknown_paths_admin_routes_and_models_are_lines_without_key_fields(
    harness: Harness, fresh: dict[str, Any], capsys: CaptureFixture
) -> None:
    answers: list[Any] = [
        harness.client.get("/v1/nothing-here", headers=bearer(fresh["key"])),
        harness.client.delete("/healthz"),
        harness.admin("GET", "/admin/keys"),
        harness.client.get("/admin/keys", headers=bearer("wrong")),
        harness.client.get("/v1/models", headers=bearer(fresh["key"])),
        harness.client.get("/healthz"),
    ]
    found = lines(capsys)
    assert [(x["method"], x["path"], x["status"], x["error"]) for x in found] == [
        ("GET", "/v1/nothing-here", 404, "invalid_request_error"),
        ("DELETE", "/healthz", 405, "invalid_request_error"),
        ("GET", "/admin/keys", 200, None),
        ("GET", "/admin/keys", 401, "authentication_error"),
        ("GET", "/v1/models", 200, None),
        ("GET", "/healthz", 200, None),
    ]
    assert [x["request_id"] for x in found] == [a.headers["x-request-id"] for a in answers]
    for line in found:
        assert tuple(line) == FIELDS
        assert {line[k] for k in METERED_FIELDS} == {None}, line


def test_an_anthropic_refusal_names_its_error_type(
    harness: Harness, capsys: CaptureFixture
) -> None:
    answer = harness.client.post("/v1/messages", json={"model": "claude-3-5-haiku"})
    assert answer.status_code == 401
    assert one_line(capsys)["error"] == "authentication_error"


def test_no_line_holds_a_key_its_hash_or_a_token(
    harness: Harness, settings: Settings, capsys: CaptureFixture
) -> None:
    created = harness.create_key(name="secretive", rpm=1)
    secret = created["key"]
    harness.chat(secret)
    harness.chat(secret)  # 429
    harness.chat(secret, {**HELLO, "stream": True})
    harness.admin("GET", f"/admin/keys/{created['id']}")
    harness.client.get("/admin/keys", headers=bearer(secret))
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 6
    assert settings.upstream_api_key is not None
    for forbidden in (secret, hash_key(secret), ADMIN_TOKEN, settings.upstream_api_key):
        assert forbidden not in out


def test_text_format_is_one_logfmt_line_per_request_with_odd_values_quoted(
    harness_factory: HarnessFactory, settings: Settings, capsys: CaptureFixture
) -> None:
    with harness_factory(settings, access_log="text") as harness:
        key = harness.create_key(name='name with "quotes"')["key"]
        ok = harness.chat(key)
        odd = harness.chat(key, {**HELLO, "model": "no-such-model\n"})
        refused = harness.chat("not-a-key")
        out = capsys.readouterr().out.splitlines()
    assert (ok.status_code, odd.status_code, refused.status_code) == (200, 200, 401)
    assert len(out) == 4
    admin, success, odd_line, refused_line = out
    assert re.fullmatch(
        r"ts=\S+ request_id=[0-9a-f]{32} method=POST path=/admin/keys status=201 "
        r"latency_ms=[0-9.]+",
        admin,
    ), admin
    assert (
        f"request_id={ok.headers['x-request-id']} method=POST path=/v1/chat/completions "
        "status=200 " in success
    )
    assert (
        ' key_name="name with \\"quotes\\"" model=gpt-4o-mini upstream=default attempts=1 '
        "stream=false prompt_tokens=" in success
    )
    assert "error=" not in success
    assert ' model="no-such-model\\n" ' in odd_line
    assert re.fullmatch(
        r"ts=\S+ request_id=[0-9a-f]{32} method=POST path=/v1/chat/completions status=401 "
        r"latency_ms=[0-9.]+ error=authentication_error",
        refused_line,
    ), refused_line


def test_off_writes_no_line(
    harness_factory: HarnessFactory, settings: Settings, capsys: CaptureFixture
) -> None:
    with harness_factory(settings, access_log="off") as harness:
        key = harness.create_key()["key"]
        assert harness.chat(key).status_code == 200
        assert harness.client.get("/nope").status_code == 404
    assert capsys.readouterr().out == ""
