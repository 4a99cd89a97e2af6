"""The sweeper turns requests whose proxy died (lease run out) into estimated records."""

from __future__ import annotations

import json

import pytest

from proxy import store as keys_of
from proxy.credits import load_prices
from proxy.keys import Keyring, parse_key
from proxy.limits import Limiter
from proxy.settlement import InFlight
from proxy.store import Store, embedded_client
from proxy.sweeper import LOCK_KEY, SWEPT_STATUS, Sweeper

LEASE_MS = 20_000


@pytest.mark.anyio
async def test_expired_request_gets_one_estimated_record_and_frees_its_reservation() -> None:
    store = Store(embedded_client())
    prices = load_prices(None)
    record = await Keyring(store).create(
        name="crashy", limits={"max_concurrency": 1}, credits_micros=10_000,
        allowed_models=None, metadata={},
    )  # fmt: skip
    presented = parse_key(record["key"])
    assert presented is not None
    limiter = Limiter(store, lease_ms=LEASE_MS)
    seconds, micros = await store.client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    marker = InFlight(
        ts=1_700_000_000.5, model="gpt-4o-mini", route="chat_completions",
        path="/v1/chat/completions", stream=True, prompt=1200,
    ).encode()  # fmt: skip
    live = await limiter.admit(
        presented, request_id="live", model="gpt-4o-mini", token_estimate=10, cost_micros=500,
        marker=marker,
    )  # fmt: skip
    assert live.admitted
    await limiter.settle(
        presented.key_id, request_id="live", day="2026-01-01", model="gpt-4o-mini",
        prompt_tokens=1, completion_tokens=1, cost_micros=1, record_json="{}",
    )  # fmt: skip
    dead = await limiter.admit(
        presented, request_id="dead", model="gpt-4o-mini", token_estimate=10, cost_micros=500,
        marker=marker, now_ms=now_ms - LEASE_MS - 1,
    )  # fmt: skip
    assert dead.admitted
    assert (await store.client.hget(keys_of.record_key(presented.key_id), "reserved")) == "500"

    sweeper = Sweeper(store, limiter, prices, every_ms=1)
    assert await sweeper.sweep() == 1

    fields = await store.client.hgetall(keys_of.record_key(presented.key_id))
    expected_cost = prices.cost_micros("gpt-4o-mini", 1200, 0)
    assert fields["reserved"] == "0"
    assert int(fields["credits"]) == 10_000 - 1 - expected_cost
    assert await store.client.zcard(keys_of.inflight_key(presented.key_id)) == 0
    entries = await store.client.xrange(keys_of.usage_key(presented.key_id))
    swept = [json.loads(f["r"]) for _, f in entries if json.loads(f["r"]).get("request_id")]
    assert len(swept) == 1
    assert swept[0]["request_id"] == "dead"
    assert swept[0]["usage_source"] == "estimated"
    assert swept[0]["status"] == SWEPT_STATUS
    assert (swept[0]["route"], swept[0]["path"]) == ("chat_completions", "/v1/chat/completions")
    assert (swept[0]["prompt_tokens"], swept[0]["completion_tokens"]) == (1200, 0)
    assert swept[0]["ts"].startswith("2023-11-14T22:13:20.500")
    await store.client.delete(LOCK_KEY)
    assert await sweeper.sweep() == 0  # nothing left; settling is once per request
