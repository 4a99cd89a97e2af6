"""Limits and credits across two real proxy processes sharing one Redis (or a Redis Cluster),
driven concurrently over HTTP and with the official OpenAI SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.credits import load_prices
from proxy.metering import estimate_prompt_tokens
from tests.admin_client import Admin
from tests.servers import ProxyServer, mock_upstream_server, proxy_server, tollgate_env

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


class Pair:
    """Two proxies over one store, their admin APIs, and the mock upstream behind them."""

    def __init__(self, proxies: list[ProxyServer], admins: list[Admin], upstream: str) -> None:
        self.proxies = proxies
        self.admins = admins
        self.upstream_root = upstream.removesuffix("/v1")

    async def burst(
        self, key: str, count: int, body: dict[str, Any] | None = None
    ) -> list[httpx.Response]:
        """`count` concurrent requests, alternating between the two proxies."""
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        self.proxies[i % 2].url + "/v1/chat/completions",
                        json=body or BODY,
                        headers={"authorization": f"Bearer {key}"},
                    )
                    for i in range(count)
                )
            )


@pytest.fixture(scope="module", params=["redis", "cluster"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    if request.param == "redis":
        redis_url: str = request.getfixturevalue("real_redis").url
        cluster: dict[str, str] = {}
    else:
        node = request.getfixturevalue("real_cluster")[0]
        redis_url = f"redis://127.0.0.1:{node.port}"
        cluster = {"TOLLGATE_REDIS_CLUSTER": "true"}
    with mock_upstream_server() as upstream:
        env = tollgate_env(redis_url=redis_url, upstream_url=upstream, **cluster)
        with (
            proxy_server(env=env) as first,
            proxy_server(env=env) as second,
            Admin(first.url) as first_admin,
            Admin(second.url) as second_admin,
        ):
            yield Pair([first, second], [first_admin, second_admin], upstream)


def test_fifty_concurrent_requests_on_two_processes_admit_exactly_rpm(pair: Pair) -> None:
    key = pair.admins[0].create_key(name="limits", rpm=10)["key"]
    responses = asyncio.run(pair.burst(key, 50))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["retry-after-ms"]) > 0


def test_racing_requests_never_overdraw_credits(pair: Pair) -> None:
    body = {**BODY, "max_tokens": 1000}
    prices = load_prices(None)
    reservation = prices.cost_micros("gpt-4o-mini", estimate_prompt_tokens(body), 1000)
    credits_micros = 5 * reservation + reservation // 2
    record = pair.admins[0].create_key(name="limits", credits=credits_micros / 1_000_000)
    responses = asyncio.run(pair.burst(record["key"], 40, body))
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(served) + len(refused) == 40
    assert len(served) >= 5
    assert refused[0].json()["error"]["type"] == "insufficient_credits"
    assert refused[0].headers["x-should-retry"] == "false"
    after = pair.admins[1].key(record["id"])
    assert after["reserved_credits"] == 0
    assert after["credits"] >= 0
    ids = {r.headers["x-request-id"] for r in served}
    charged = sum(
        round(rec["cost_usd"] * 1_000_000)
        for rec in pair.admins[0].export(since=0)
        if rec["request_id"] in ids
    )
    assert round(after["credits"] * 1_000_000) == credits_micros - charged


def test_concurrency_limit_holds_streams_across_processes(pair: Pair) -> None:
    httpx.post(pair.upstream_root + "/_mock/reset")
    key = pair.admins[0].create_key(name="limits", max_concurrency=2)["key"]
    body = {**BODY, "model": "mock-slow", "stream": True}
    responses = asyncio.run(pair.burst(key, 6, body))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert all(
        "concurrent" in r.json()["error"]["message"] for r in responses if r.status_code == 429
    )
    assert httpx.get(pair.upstream_root + "/_mock/requests").json()["max_open_streams"] == 2
    # Slots are released when the streams end.
    assert [r.status_code for r in asyncio.run(pair.burst(key, 2, body))] == [200, 200]


def test_sdk_retries_after_429_using_the_retry_headers_and_succeeds(pair: Pair) -> None:
    key = pair.admins[0].create_key(name="sdk-retry", rpm=20)["key"]  # one request every 3 s
    statuses = [r.status_code for r in asyncio.run(pair.burst(key, 22))]
    assert statuses.count(429) == 2
    client = openai.OpenAI(base_url=pair.proxies[0].url + "/v1", api_key=key, max_retries=4)
    with client:
        raw = client.chat.completions.with_raw_response.create(**BODY)  # type: ignore[call-overload]
    assert raw.http_response.status_code == 200
    assert raw.retries_taken >= 1
    assert raw.parse().choices[0].message.content


def test_sdk_without_retries_sees_rate_limit_error(pair: Pair) -> None:
    key = pair.admins[0].create_key(name="limits", rpm=1)["key"]
    client = openai.OpenAI(base_url=pair.proxies[1].url + "/v1", api_key=key, max_retries=0)
    with client:
        client.chat.completions.create(**BODY)  # type: ignore[call-overload]
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert caught.value.response.headers["retry-after"] == "60"
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
