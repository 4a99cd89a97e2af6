"""The upstream hop: what goes upstream (the operator's key, never the client's; allowlisted
and operator-listed headers only) and what comes back (Tollgate's rate-limit headers, no
redirect), and transport failures as 502."""

from __future__ import annotations

import httpx

from proxy.config import Settings
from tests.answers import assert_error, completion
from tests.conftest import HELLO, Harness, HarnessFactory, bearer
from tests.servers import free_port


def test_client_key_never_reaches_upstream(harness: Harness, key: str) -> None:
    response = harness.chat(key, HELLO, headers={"x-api-key": key, "api-key": key})
    assert response.status_code == 200
    upstream = harness.mock.requests[-1]["headers"]
    assert upstream["authorization"] == "Bearer sk-upstream-secret"
    assert "x-api-key" not in upstream
    assert "api-key" not in upstream
    assert all(key not in value for value in upstream.values())


def test_no_upstream_key_configured_sends_no_authorization(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, upstream_api_key=None) as harness:
        key = harness.create_key()["key"]
        assert harness.chat(key, HELLO).status_code == 200
        upstream = harness.mock.requests[-1]["headers"]
        assert "authorization" not in upstream
        assert all(key not in value for value in upstream.values())


def test_only_allowlisted_client_headers_go_upstream(harness: Harness, key: str) -> None:
    headers = {
        "connection": "keep-alive, x-hop-secret",
        "x-hop-secret": "for-this-hop-only",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "trailer": "x-checksum",
        "upgrade": "h2c",
        "proxy-authorization": "Basic cHJveHk6cGFzcw==",
        "proxy-connection": "keep-alive",
        "cookie": "session=abc",
        "x-custom-header": "not forwarded",
        "openai-organization": "org-of-the-client",
        "openai-project": "proj-of-the-client",
        "x-forwarded-for": "10.0.0.1",
        "forwarded": "for=10.0.0.1",
        "x-stainless-lang": "python",
        "openai-beta": "assistants=v2",
        "user-agent": "OpenAI/Python 9.9",
    }
    response = harness.chat(key, HELLO, headers=headers)
    assert response.status_code == 200, response.text
    upstream = harness.mock.requests[-1]["headers"]
    sent_names = {name.lower() for name in headers}
    assert sent_names & set(upstream) == {"openai-beta", "user-agent"}
    assert upstream["openai-beta"] == "assistants=v2"
    assert upstream["user-agent"] == "OpenAI/Python 9.9"
    assert "x-hop-secret" not in upstream.get("connection", "")
    for name in ("openai-organization", "openai-project", "x-forwarded-for", "x-custom-header"):
        assert name not in upstream, name
    assert upstream["accept-encoding"] == "identity"


def test_operator_listed_headers_are_forwarded_too(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, forward_headers=("x-gateway-route",)) as harness:
        key = harness.create_key()["key"]
        headers = {"x-gateway-route": "eu", "x-other": "no"}
        assert harness.chat(key, HELLO, headers=headers).status_code == 200
        upstream = harness.mock.requests[-1]["headers"]
        assert upstream["x-gateway-route"] == "eu"
        assert "x-other" not in upstream


def test_upstream_ratelimit_headers_are_replaced_by_tollgates(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-tokens": "29999990",
            "x-ratelimit-reset-tokens": "0s",
            "ratelimit-policy": '"upstream";q=1;w=1',
            "openai-processing-ms": "123",
        }
        return httpx.Response(200, json=completion(), headers=headers)

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        unlimited = harness.chat(harness.create_key()["key"], HELLO)
        assert unlimited.status_code == 200
        assert not [h for h in unlimited.headers if h.startswith(("x-ratelimit-", "ratelimit"))]
        assert unlimited.headers["openai-processing-ms"] == "123"

        limited_key = harness.create_key(rpm=60, tpm=100_000)["key"]
        limited = harness.chat(limited_key, HELLO)
        assert limited.status_code == 200
        assert limited.headers.get_list("x-ratelimit-limit-requests") == ["60"]
        assert limited.headers.get_list("x-ratelimit-remaining-requests") == ["59"]
        assert limited.headers.get_list("x-ratelimit-limit-tokens") == ["100000"]
        assert '"upstream"' not in limited.headers["ratelimit-policy"]


def test_upstream_redirect_is_502_and_never_shows_its_location(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"location": "http://10.1.2.3:9000/internal/v1/x"})

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        key = harness.create_key()["key"]
        for path, body in (
            ("/v1/chat/completions", HELLO),
            ("/v1/embeddings", {"model": "m", "input": "x"}),
        ):
            response = harness.client.post(path, json=body, headers=bearer(key))
            assert_error(response, 502, "upstream_error")
            assert "location" not in response.headers
            assert "10.1.2.3" not in response.text


def test_upstream_unreachable_is_502(harness_factory: HarnessFactory, settings: Settings) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with harness_factory(settings, upstream="real", upstream_url=unreachable) as harness:
        key = harness.create_key()["key"]
        response = harness.client.post("/v1/chat/completions", json=HELLO, headers=bearer(key))
        assert_error(response, 502, "upstream_error")
        streamed = harness.client.post(
            "/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer(key)
        )
        assert_error(streamed, 502, "upstream_error")
        assert_error(harness.client.get("/v1/models", headers=bearer(key)), 502, "upstream_error")
        embeddings = harness.client.post(
            "/v1/embeddings", json={"model": "m", "input": "x"}, headers=bearer(key)
        )
        assert_error(embeddings, 502, "upstream_error")
        assert harness.client.get("/healthz").status_code == 200


def test_upstream_connection_error_is_502(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        response = harness.chat(harness.create_key()["key"], HELLO)
        assert_error(response, 502, "upstream_error")
