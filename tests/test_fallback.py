"""Fallback across upstreams inside one process: each upstream a host of one transport that
refuses, stalls, answers 5xx/429 or serves the mock upstream. Routing by `name/model`, the
`provider` object, passive health, one reservation and one settlement per request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from proxy.config import Settings
from proxy.credits import load_prices
from proxy.mock_upstream import MockState, create_mock_upstream
from proxy.registry import UpstreamConfig
from tests.answers import assert_error
from tests.conftest import Harness, HarnessFactory, bearer

HELLO = [{"role": "user", "content": "Hello"}]
PRICES = """
[models."gpt-4o-mini"]
input = 1.0
output = 2.0

[models."backup/gpt-4o-mini"]
input = 10.0
output = 20.0
"""


class Upstreams(httpx.AsyncBaseTransport):
    """Hosts `primary`, `backup`, `third`: each healthy (the mock upstream) unless told to
    refuse, stall, or answer a status. Remembers which host got what, in order."""

    def __init__(self, state: MockState) -> None:
        self.mock = httpx.ASGITransport(app=create_mock_upstream(state))
        self.faults: dict[str, Any] = {}
        self.tried: list[tuple[str, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path.endswith("/models"):  # each upstream's model list
            return await self.mock.handle_async_request(request)
        body = await request.aread()
        self.tried.append((host, body))
        fault = self.faults.get(host)
        if fault == "refuse":
            raise httpx.ConnectError("refused", request=request)
        if fault == "reset":  # sent, then the connection broke before the head
            raise httpx.ReadError("reset", request=request)
        if fault == "stall":
            await asyncio.sleep(30)
        if fault == "cut":  # a stream that breaks after its first event
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=_CutStream()
            )
        if isinstance(fault, int):
            error = {"error": {"message": "upstream trouble", "type": "server_error"}}
            return httpx.Response(fault, json=error, headers={"retry-after": "1"})
        return await self.mock.handle_async_request(request)

    def hosts(self) -> list[str]:
        return [host for host, _ in self.tried]


class _CutStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        raise httpx.ReadError("connection reset mid-stream")


def _config(name: str, **fields: Any) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://{name}/v1", api_key=f"sk-{name}", **fields)


THREE = (
    _config("primary", priority=1),
    _config("backup", priority=2),
    _config("third", priority=3),
)


@pytest.fixture
def upstreams(mock_state: MockState) -> Upstreams:
    return Upstreams(mock_state)


@pytest.fixture
def gateway(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> Iterator[Harness]:
    with harness_factory(
        settings,
        upstream=upstreams,
        upstreams=THREE,
        prices=load_prices(PRICES),
        upstream_attempt_timeout_s=0.3,
        upstream_failure_threshold=2,
        upstream_cooldown_s=0.5,
    ) as harness:
        yield harness


def _chat(harness: Harness, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": HELLO, **body}
    return harness.client.post("/v1/chat/completions", json=payload, headers=bearer(key))


def _records(harness: Harness, key_id: str) -> list[dict[str, Any]]:
    return [r for r in harness.export() if r["key_id"] == key_id]


def _metric(harness: Harness, name: str, labels: dict[str, str]) -> float:
    value = harness.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.mark.parametrize("fault", [503, 429, "refuse", "reset", "stall"])
def test_a_failing_first_upstream_falls_back_and_the_request_is_charged_once(
    gateway: Harness, upstreams: Upstreams, fault: Any
) -> None:
    upstreams.faults["primary"] = fault
    key = gateway.create_key(credits=1.0)
    response = _chat(gateway, key["key"])
    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "backup"
    assert upstreams.hosts() == ["primary", "backup"]
    first, second = (body for _, body in upstreams.tried)
    assert first == second  # the same bytes again
    [record] = _records(gateway, key["id"])
    assert (record["upstream"], record["attempts"], record["status"]) == ("backup", 2, 200)
    # Charged once, at backup's own price (10 / 20 USD per million tokens).
    expected = (record["prompt_tokens"] * 10 + record["completion_tokens"] * 20) / 1e6
    assert record["cost_usd"] == pytest.approx(expected, abs=1e-6)
    after = gateway.admin("GET", f"/admin/keys/{key['id']}").json()
    assert after["credits"] == pytest.approx(1.0 - record["cost_usd"], abs=1e-6)
    assert after["reserved_credits"] == 0
    outcome = {503: "5xx", 429: "429", "refuse": "connect", "reset": "connect"}.get(
        fault, "timeout"
    )
    labels = {"upstream": "primary", "outcome": outcome}
    assert _metric(gateway, "tollgate_upstream_requests_total", labels) == 1
    moves = {"from": "primary", "to": "backup"}
    assert _metric(gateway, "tollgate_upstream_fallbacks_total", moves) == 1


def test_a_stream_falls_back_before_its_first_byte(gateway: Harness, upstreams: Upstreams) -> None:
    upstreams.faults["primary"] = 502
    key = gateway.create_key()
    with gateway.client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
        headers=bearer(key["key"]),
    ) as response:
        assert response.status_code == 200
        text = b"".join(response.iter_raw()).decode()
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    [record] = _records(gateway, key["id"])
    assert (record["upstream"], record["attempts"], record["usage_source"]) == (
        "backup", 2, "upstream",
    )  # fmt: skip


def test_a_stream_cut_midway_is_not_tried_again(gateway: Harness, upstreams: Upstreams) -> None:
    upstreams.faults["primary"] = "cut"
    key = gateway.create_key()
    with gateway.client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
        headers=bearer(key["key"]),
    ) as response:
        text = b"".join(response.iter_raw()).decode()
    assert response.status_code == 200
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("data: ") and "error" in json.loads(last[6:])
    assert upstreams.hosts() == ["primary"]
    [record] = _records(gateway, key["id"])
    assert record["attempts"] == 1


def test_every_upstream_failing_names_each_attempt_and_is_recorded_at_no_cost(
    gateway: Harness, upstreams: Upstreams
) -> None:
    upstreams.faults.update(primary=503, backup="refuse", third=500)
    key = gateway.create_key(credits=1.0)
    response = _chat(gateway, key["key"])
    error = assert_error(response, 502, "upstream_error")
    assert error["message"] == (
        "All 3 upstream attempts failed: primary: status 503; backup: connection failed; "
        "third: status 500"
    )
    assert "http://" not in response.text and "sk-" not in response.text
    assert "x-tollgate-upstream" not in response.headers
    [record] = _records(gateway, key["id"])
    assert (record["status"], record["cost_usd"], record["attempts"]) == (502, 0, 3)
    assert record["upstream"] == "third"
    after = gateway.admin("GET", f"/admin/keys/{key['id']}").json()
    assert (after["credits"], after["reserved_credits"]) == (1.0, 0)


def test_when_no_attempt_reached_an_upstream_nothing_is_recorded(
    gateway: Harness, upstreams: Upstreams
) -> None:
    upstreams.faults.update(primary="refuse", backup="refuse", third="refuse")
    key = gateway.create_key(credits=1.0)
    response = _chat(gateway, key["key"])
    error = assert_error(response, 502, "upstream_error")
    assert error["message"].startswith("All 3 upstream attempts failed: primary: connection")
    assert _records(gateway, key["id"]) == []
    after = gateway.admin("GET", f"/admin/keys/{key['id']}").json()
    assert (after["credits"], after["reserved_credits"]) == (1.0, 0)


def test_the_last_upstreams_own_4xx_is_passed_back(gateway: Harness, upstreams: Upstreams) -> None:
    upstreams.faults.update(primary=503, backup=503, third=429)
    key = gateway.create_key()
    response = _chat(gateway, key["key"])
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "upstream trouble"
    assert upstreams.hosts() == ["primary", "backup", "third"]


def test_attempts_stop_at_the_configured_most(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> None:
    upstreams.faults.update(primary=503, backup=503)
    with harness_factory(
        settings, upstream=upstreams, upstreams=THREE, upstream_max_attempts=2
    ) as harness:
        key = harness.create_key()
        response = _chat(harness, key["key"])
        error = assert_error(response, 502, "upstream_error")
        assert error["message"].startswith("All 2 upstream attempts failed")
        assert upstreams.hosts() == ["primary", "backup"]


def test_a_stalled_last_upstream_ends_at_the_request_deadline_with_504(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> None:
    upstreams.faults.update(primary=503, backup="stall")
    two = THREE[:2]
    with harness_factory(
        settings, upstream=upstreams, upstreams=two, upstream_timeout_s=0.5
    ) as harness:
        key = harness.create_key()
        response = _chat(harness, key["key"])
        error = assert_error(response, 504, "upstream_timeout", "upstream_timeout")
        assert error["message"] == (
            "All 2 upstream attempts failed: primary: status 503; backup: timed out"
        )


def test_a_named_upstream_gets_the_bare_model_and_no_other_is_tried(
    gateway: Harness, upstreams: Upstreams, mock_state: MockState
) -> None:
    upstreams.faults["third"] = 503
    key = gateway.create_key()
    response = _chat(gateway, key["key"], model="third/gpt-4o-mini")
    assert_error(response, 502, "upstream_error")
    assert upstreams.hosts() == ["third"]
    ok = _chat(gateway, key["key"], model="backup/gpt-4o-mini")
    assert ok.status_code == 200, ok.text
    assert json.loads(upstreams.tried[-1][1])["model"] == "gpt-4o-mini"
    assert mock_state.requests[-1]["body"]["model"] == "gpt-4o-mini"
    records = _records(gateway, key["id"])
    assert [(r["model"], r["upstream"]) for r in records] == [
        ("gpt-4o-mini", "third"), ("gpt-4o-mini", "backup"),
    ]  # fmt: skip


def test_a_model_no_upstream_serves_is_404_before_any_upstream_call(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> None:
    only_gpt = (_config("primary", models=("gpt-*",)),)
    with harness_factory(settings, upstream=upstreams, upstreams=only_gpt) as harness:
        key = harness.create_key()
        for model in ("llama-3", "nowhere/gpt-4o"):
            response = _chat(harness, key["key"], model=model)
            assert_error(response, 404, "invalid_request_error", "model_not_found")
        assert upstreams.tried == []


@pytest.mark.parametrize(
    ("provider", "tried"),
    [
        ({"order": ["third", "backup"]}, ["third", "backup", "primary"]),
        ({"only": ["backup", "third"]}, ["backup", "third"]),
        ({"ignore": ["primary"]}, ["backup", "third"]),
        ({"order": ["third"], "allow_fallbacks": False}, ["third"]),
        ({"allow_fallbacks": False}, ["primary"]),
        ({"order": ["nobody", "backup"], "sort": "price"}, ["backup", "primary", "third"]),
    ],
)
def test_the_provider_object_narrows_and_reorders_the_candidates(
    gateway: Harness, upstreams: Upstreams, provider: dict[str, Any], tried: list[str]
) -> None:
    upstreams.faults.update(primary=503, backup=503, third=503)
    key = gateway.create_key()
    _chat(gateway, key["key"], provider=provider)
    assert upstreams.hosts() == tried
    for _, body in upstreams.tried:
        forwarded = json.loads(body)
        assert "provider" not in forwarded
        assert forwarded["messages"] == HELLO


def test_a_body_without_provider_goes_byte_for_byte(gateway: Harness, upstreams: Upstreams) -> None:
    key = gateway.create_key()
    raw = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "provider"}]}'
    headers = {**bearer(key["key"]), "content-type": "application/json"}
    response = gateway.client.post("/v1/chat/completions", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    assert upstreams.tried[-1][1] == raw


def test_a_provider_key_written_with_an_escape_is_still_read_and_removed(
    gateway: Harness, upstreams: Upstreams
) -> None:
    upstreams.faults["primary"] = 503
    key = gateway.create_key()
    raw = (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],'
        b' "\\u0070rovider": {"only": ["third"]}}'
    )
    headers = {**bearer(key["key"]), "content-type": "application/json"}
    response = gateway.client.post("/v1/chat/completions", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    assert upstreams.hosts() == ["third"]
    assert "provider" not in json.loads(upstreams.tried[-1][1])


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ("openai", "provider"),
        ({"order": "backup"}, "provider.order"),
        ({"only": [1]}, "provider.only"),
        ({"ignore": [""]}, "provider.ignore"),
        ({"allow_fallbacks": "no"}, "provider.allow_fallbacks"),
    ],
)
def test_a_bad_provider_object_is_a_400_naming_the_field(
    gateway: Harness, upstreams: Upstreams, provider: Any, param: str
) -> None:
    key = gateway.create_key()
    response = _chat(gateway, key["key"], provider=provider)
    error = assert_error(response, 400, "invalid_request_error")
    assert error["param"] == param
    assert upstreams.tried == []


def test_provider_preferences_that_leave_nothing_are_a_404(
    gateway: Harness, upstreams: Upstreams
) -> None:
    key = gateway.create_key()
    response = _chat(gateway, key["key"], provider={"only": ["elsewhere"]})
    error = assert_error(response, 404, "invalid_request_error", "model_not_found")
    assert "provider" in error["message"]
    assert upstreams.tried == []


def test_a_failing_upstream_is_skipped_then_probed_once_after_its_cooldown(
    gateway: Harness, upstreams: Upstreams
) -> None:
    healthy = {"upstream": "primary"}
    upstreams.faults["primary"] = 503
    key = gateway.create_key()
    for _ in range(2):  # the threshold: two failures in a row
        assert _chat(gateway, key["key"]).status_code == 200
    assert _metric(gateway, "tollgate_upstream_healthy", healthy) == 0
    upstreams.tried.clear()
    assert _chat(gateway, key["key"]).status_code == 200
    assert upstreams.hosts() == ["backup"]  # skipped while it cools down
    upstreams.faults.clear()
    gateway.run(asyncio.sleep, 0.6)
    upstreams.tried.clear()
    assert _chat(gateway, key["key"]).headers["x-tollgate-upstream"] == "primary"  # the probe
    assert _metric(gateway, "tollgate_upstream_healthy", healthy) == 1
    assert _chat(gateway, key["key"]).headers["x-tollgate-upstream"] == "primary"
    assert upstreams.hosts() == ["primary", "primary"]


def test_an_upstream_skipped_by_health_is_still_tried_when_it_is_the_only_one(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> None:
    upstreams.faults["primary"] = 503
    with harness_factory(
        settings, upstream=upstreams, upstreams=THREE[:1], upstream_failure_threshold=1
    ) as harness:
        key = harness.create_key()
        for _ in range(3):
            assert_error(_chat(harness, key["key"]), 502, "upstream_error")
        assert upstreams.hosts() == ["primary"] * 3


def test_a_candidate_without_a_price_makes_the_request_unpriced(
    harness_factory: HarnessFactory, settings: Settings, upstreams: Upstreams
) -> None:
    prices = load_prices('[models."primary/gpt-4o-mini"]\ninput = 1\noutput = 2\n')
    with harness_factory(
        settings, upstream=upstreams, upstreams=THREE[:2], prices=prices
    ) as harness:
        key = harness.create_key(credits=1.0)
        response = _chat(harness, key["key"])
        assert_error(response, 403, "permission_error", "model_not_allowed")
        assert upstreams.tried == []
        pinned = _chat(harness, key["key"], model="primary/gpt-4o-mini")
        assert pinned.status_code == 200, pinned.text
