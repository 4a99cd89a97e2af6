"""Budgets, expiry, rotation grace, restore and per-model limits across two real `tollgate serve`
processes on one real redis-server: whatever one process's admin API changes, the other sees at
once, and requests spread over both share one budget and one set of buckets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from proxy.credits import load_prices
from proxy.metering import estimate_prompt_tokens
from tests.admin_client import Admin
from tests.integration.conftest import MESSAGES, Mock
from tests.servers import ProxyServer, proxy_server, redis_server, tollgate_env

MINI = "gpt-4o-mini"


@dataclass
class Pair:
    """Two proxies on one Redis and one upstream, with an admin client for each."""

    proxies: list[ProxyServer]
    admins: list[Admin]

    def patch(self, side: int, key_id: str, **fields: Any) -> dict[str, Any]:
        response = self.admins[side].client.patch(f"/admin/keys/{key_id}", json=fields)
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    def post(self, side: int, path: str, **body: Any) -> dict[str, Any]:
        response = self.admins[side].client.post(path, json=body or None)
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    def sdk(self, side: int, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.proxies[side].url + "/v1", api_key=key, max_retries=0)

    def burst(self, key: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
        """One request per body, all released together from their own threads, alternating
        between the two proxies (even indexes to the first, odd to the second)."""
        start = threading.Barrier(len(bodies), timeout=30)

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=self.proxies[i % 2].url, timeout=30) as client:
                start.wait()
                return client.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {key}"},
                    json=bodies[i],
                )

        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            return list(pool.map(one, range(len(bodies))))


@pytest.fixture(scope="module")
def pair(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with redis_server() as redis:

        def env(name: str) -> dict[str, str]:
            spool = tmp_path_factory.mktemp(name)
            return tollgate_env(redis_url=redis.url, upstream_url=mock.url, spool_dir=spool)

        with (
            proxy_server(env=env("first")) as first,
            proxy_server(env=env("second")) as second,
            Admin(first.url) as first_admin,
            Admin(second.url) as second_admin,
        ):
            yield Pair([first, second], [first_admin, second_admin])


def _chat(sdk: openai.OpenAI, model: str = MINI) -> str:
    return sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5).id


def _refused(sdk: openai.OpenAI) -> tuple[str, str]:
    """The messages of the 401s a chat completion and the model list get."""
    with pytest.raises(openai.AuthenticationError) as chat:
        _chat(sdk)
    with pytest.raises(openai.AuthenticationError) as models:
        sdk.models.list()
    assert chat.value.status_code == models.value.status_code == 401
    assert chat.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    return chat.value.body["message"], models.value.body["message"]  # type: ignore[index]


def _accepted(sdk: openai.OpenAI) -> bool:
    """Whether a chat completion with this key passes (False on a 401)."""
    try:
        return bool(_chat(sdk))
    except openai.AuthenticationError:
        return False


def _settled_records(pair: Pair, key_id: str, since: float, count: int) -> list[dict[str, Any]]:
    """The key's usage records once `count` of them have landed (settlement may follow the
    answer by a moment), read through the second proxy; bounded to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in pair.admins[1].export(since=since) if r["key_id"] == key_id]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_forty_racing_requests_over_two_proxies_never_exceed_one_budget(pair: Pair) -> None:
    since = time.time()
    body = {"model": MINI, "messages": MESSAGES, "max_tokens": 20}
    worst = load_prices(None).cost_micros(MINI, estimate_prompt_tokens(body), 20)
    budget_micros = 5 * worst + worst // 2
    key = pair.admins[0].create_key(budget={"amount": budget_micros / 1e6, "period": "month"})
    assert key["budget_spent"] == 0

    responses = pair.burst(key["key"], [body] * 40)

    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(served) + len(refused) == 40, [r.status_code for r in responses]
    # Five worst cases fit whatever the interleaving; real costs are close to the worst case,
    # so forty of them cannot all fit.
    assert len(served) >= 5
    assert refused

    record = pair.admins[1].key(key["id"])
    resets_at = record["budget_resets_at"]
    reset = datetime.fromisoformat(resets_at.replace("Z", "+00:00"))
    for answer in refused:
        error = answer.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert error["type"] == "insufficient_credits"
        assert resets_at in error["message"]
        wait_s = (reset - datetime.now(UTC)).total_seconds()
        assert abs(int(answer.headers["retry-after"]) - wait_s) <= 30
        assert abs(int(answer.headers["retry-after-ms"]) / 1000 - wait_s) <= 30

    records = _settled_records(pair, key["id"], since, len(served))
    assert sorted(r["request_id"] for r in records) == sorted(
        r.headers["x-request-id"] for r in served
    )
    charged = sum(round(r["cost_usd"] * 1_000_000) for r in records)
    assert 0 < charged <= budget_micros
    # Both proxies show the same spend, and it is what the usage records charged.
    for admin in pair.admins:
        after = admin.key(key["id"])
        assert round(after["budget_spent"] * 1_000_000) == charged
        assert after["budget"] == {"amount": budget_micros / 1e6, "period": "month"}
        assert after["reserved_credits"] == 0

    # Lowered through the second proxy to what is spent, the budget refuses on both at once.
    lowered = pair.patch(1, key["id"], budget={"amount": charged / 1e6, "period": "month"})
    assert round(lowered["budget_spent"] * 1_000_000) == charged
    for side in (0, 1):
        with pair.sdk(side, key["key"]) as sdk, pytest.raises(openai.APIStatusError) as over:
            _chat(sdk)
        assert over.value.status_code == 402
        assert over.value.body["code"] == "budget_exceeded"  # type: ignore[index]
        assert int(over.value.response.headers["retry-after"]) >= 1


def test_expiry_set_through_one_proxy_is_seen_at_once_by_the_other(pair: Pair) -> None:
    key = pair.admins[0].create_key()
    with pair.sdk(0, key["key"]) as first, pair.sdk(1, key["key"]) as second:
        assert _chat(first) and _chat(second)
        past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
        assert pair.patch(0, key["id"], expires_at=past)["expires_at"] is not None
        assert _refused(second) == ("API key expired", "API key expired")
        assert _refused(first) == ("API key expired", "API key expired")
        assert pair.admins[1].key(key["id"])["expires_at"] is not None

        # Lifted through the second proxy, the first serves the key again.
        assert pair.patch(1, key["id"], expires_at=None)["expires_at"] is None
        assert _chat(first) and _chat(second)
        assert [m.id for m in first.models.list()]

        # An expiry a moment ahead, set through the second, ends the key on both by itself.
        soon = datetime.now(UTC) + timedelta(seconds=1)
        pair.patch(1, key["id"], expires_at=soon.isoformat())
        deadline = time.monotonic() + 10
        while _accepted(first) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert datetime.now(UTC) >= soon - timedelta(milliseconds=100)
        assert _refused(first) == ("API key expired", "API key expired")
        assert _refused(second) == ("API key expired", "API key expired")


def test_rotation_grace_through_one_proxy_holds_on_both_until_it_ends(pair: Pair) -> None:
    key = pair.admins[0].create_key()
    before = datetime.now(UTC)
    rotated = pair.post(0, f"/admin/keys/{key['id']}/rotate", grace_seconds=2)
    assert rotated["key"] != key["key"]
    until = datetime.fromisoformat(rotated["previous_secret_valid_until"].replace("Z", "+00:00"))
    assert timedelta(seconds=1.9) <= until - before <= timedelta(seconds=4)
    assert pair.admins[1].key(key["id"])["previous_secret_valid_until"] is not None
    olds = [pair.sdk(0, key["key"]), pair.sdk(1, key["key"])]
    news = [pair.sdk(0, rotated["key"]), pair.sdk(1, rotated["key"])]
    try:
        # Poll both at once after the rotation, bounded: the old secret works on each until the
        # grace ends, then on none. An accepted request was admitted after it was sent, a
        # refused one before its answer came.
        last_sent: list[list[datetime]] = [[], []]
        refused_at: datetime | None = None
        deadline = time.monotonic() + 10
        while refused_at is None and time.monotonic() < deadline:
            for side, old in enumerate(olds):
                sent = datetime.now(UTC)
                if _accepted(old):
                    last_sent[side].append(sent)
                else:
                    refused_at = datetime.now(UTC)
                    break
            time.sleep(0.1)
        assert refused_at is not None, "the old secret still worked 10 s after a 2 s grace"
        assert refused_at >= until - timedelta(milliseconds=100), (refused_at, until)
        assert all(last_sent), "the old secret was refused on a proxy within its grace"
        latest = max(max(sent) for sent in last_sent)
        assert latest <= until + timedelta(milliseconds=100), (latest, until)
        for old, new in zip(olds, news, strict=True):
            assert _refused(old) == ("Invalid API key provided", "Invalid API key provided")
            assert _chat(new)
            assert [m.id for m in new.models.list()]
    finally:
        for sdk in olds + news:
            sdk.close()


def test_revoke_and_restore_through_one_proxy_are_seen_by_the_other(pair: Pair) -> None:
    key = pair.admins[1].create_key()
    with pair.sdk(0, key["key"]) as first, pair.sdk(1, key["key"]) as second:
        assert _chat(first) and _chat(second)
        revoked = pair.admins[1].client.delete(f"/admin/keys/{key['id']}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked"] is True
        assert _refused(first) == ("Invalid API key provided", "Invalid API key provided")
        assert _refused(second) == ("Invalid API key provided", "Invalid API key provided")

        restored = pair.post(0, f"/admin/keys/{key['id']}/restore")
        assert restored["revoked"] is False
        assert pair.admins[1].key(key["id"])["revoked"] is False
        assert _chat(second) and _chat(first)
        assert [m.id for m in second.models.list()]


def test_a_model_limit_is_shared_by_both_proxies_and_leaves_other_models_alone(
    pair: Pair,
) -> None:
    key = pair.admins[0].create_key(rpm=100, model_limits={"gpt-4o": {"rpm": 3}})
    assert pair.admins[1].key(key["id"])["model_limits"] == {"gpt-4o": {"rpm": 3, "tpm": None}}
    big = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    small = {"model": MINI, "messages": MESSAGES, "max_tokens": 5}

    began = time.monotonic()
    responses = pair.burst(key["key"], [big] * 10)

    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 3, statuses
    assert statuses.count(429) == 7, statuses
    for answer in responses:
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        if answer.status_code == 429:
            error = answer.json()["error"]
            assert error["code"] == "rate_limit_exceeded"
            assert "model 'gpt-4o'" in error["message"]
            assert "(limit: 3)" in error["message"]
            assert answer.headers["x-ratelimit-remaining-requests"] == "0"
            assert int(answer.headers["retry-after"]) >= 1

    # The same key's gpt-4o-mini is bound by the key's rpm of 100 only, on both proxies.
    minis = pair.burst(key["key"], [small] * 10)
    refill = (time.monotonic() - began) * 100 / 60  # the key's bucket refills 100 a minute
    assert [r.status_code for r in minis] == [200] * 10
    assert {r.headers["x-ratelimit-limit-requests"] for r in minis} == {"100"}
    # The key's own bucket counted the 3 gpt-4o and the 10 gpt-4o-mini requests it served.
    assert min(int(r.headers["x-ratelimit-remaining-requests"]) for r in minis) <= 87 + refill

    # And gpt-4o is still refused on both while its window has not refilled.
    with pair.sdk(0, key["key"]) as first, pair.sdk(1, key["key"]) as second:
        for sdk in (first, second):
            with pytest.raises(openai.RateLimitError) as limited:
                _chat(sdk, "gpt-4o")
            assert "model 'gpt-4o'" in limited.value.body["message"]  # type: ignore[index]
            assert _chat(sdk, MINI)
