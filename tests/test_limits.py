"""The admission and settlement scripts, on fakeredis, a real redis-server and a real Redis
Cluster; time is passed in (now_ms) so nothing sleeps."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from proxy import store as keys_of
from proxy.keys import Keyring, PresentedKey, parse_key
from proxy.limits import Decision, Limiter, rate_limit_headers
from proxy.redis_mux import ClusterMux, RedisMux
from proxy.store import Store, embedded_client

T0 = 1_800_000_000_000  # a fixed "now" in ms
LEASE_MS = 240_000


@pytest.fixture(params=["fakeredis", "redis", "redis-mux", "cluster", "cluster-mux"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Every scenario runs in-process, over redis-py and over the proxy's shared connections
    (the hot path in production), on one Redis and on a cluster."""
    mux: RedisMux | ClusterMux | None = None
    timeouts = {"timeout_s": 2.0, "connect_timeout_s": 2.0}
    if request.param == "fakeredis":
        client: Any = embedded_client()
    elif request.param.startswith("redis"):
        url = request.getfixturevalue("real_redis").url
        client = aioredis.Redis.from_url(url, decode_responses=True)
        if request.param == "redis-mux":
            mux = RedisMux(url, **timeouts)
    else:
        url = f"redis://127.0.0.1:{request.getfixturevalue('real_cluster')[0].port}"
        client = RedisCluster.from_url(url, decode_responses=True)
        if request.param == "cluster-mux":
            mux = ClusterMux(client, url, **timeouts)
    the_store = Store(client, cluster=request.param.startswith("cluster"), mux=mux)
    yield the_store
    await the_store.aclose()


class Key:
    def __init__(self, store: Store, record: dict[str, Any]) -> None:
        self.store = store
        self.id: str = record["id"]
        presented = parse_key(record["key"])
        assert presented is not None
        self.presented: PresentedKey = presented
        self.limiter = Limiter(store, lease_ms=LEASE_MS)

    async def admit(
        self, now: int, *, tokens: int = 10, cost: int | None = 0, model: str = "gpt-4o-mini",
        request_id: str | None = None,
    ) -> Decision:  # fmt: skip
        return await self.limiter.admit(
            self.presented,
            request_id=request_id or secrets.token_hex(8),
            model=model,
            token_estimate=tokens,
            cost_micros=cost,
            now_ms=now,
        )

    async def settle(
        self, request_id: str, now: int, *, prompt: int = 5, completion: int = 5, cost: int = 0
    ) -> bool:
        return await self.limiter.settle(
            self.id,
            request_id=request_id,
            day="2027-01-15",
            model="gpt-4o-mini",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_micros=cost,
            record_json=json.dumps({"request_id": request_id}),
        )

    async def record(self) -> dict[str, str]:
        fields: dict[str, str] = await self.store.client.hgetall(keys_of.record_key(self.id))
        return fields

    async def bucket(self) -> dict[str, str]:
        fields: dict[str, str] = await self.store.client.hgetall(keys_of.bucket_key(self.id))
        return fields


async def new_key(
    store: Store, *, credits: int | None = None, models: list[str] | None = None, **limits: int
) -> Key:
    record = await Keyring(store).create(
        name="k", limits=dict(limits), credits_micros=credits, allowed_models=models, metadata={}
    )
    return Key(store, record)


@pytest.mark.anyio
async def test_requests_bucket_allows_capacity_then_refuses_with_exact_retry(store: Store) -> None:
    key = await new_key(store, rpm=3)
    decisions = [await key.admit(T0) for _ in range(4)]
    assert [d.verdict for d in decisions] == ["ok", "ok", "ok", "requests"]
    assert [d.requests_remaining for d in decisions[:3]] == [2, 1, 0]
    # One request refills in 60000 / 3 = 20000 ms.
    assert decisions[3].retry_after_ms == 20_000
    assert (await key.admit(T0 + 19_999)).verdict == "requests"
    assert (await key.admit(T0 + 20_000)).verdict == "ok"


@pytest.mark.anyio
async def test_requests_bucket_refills_continuously(store: Store) -> None:
    key = await new_key(store, rpm=60)
    for _ in range(60):
        assert (await key.admit(T0)).admitted
    refused = await key.admit(T0 + 500)
    assert refused.verdict == "requests"
    assert refused.retry_after_ms == 500
    assert (await key.admit(T0 + 1000)).admitted
    # After a long idle time the bucket is full again, never above capacity.
    later = await key.admit(T0 + 3_600_000)
    assert later.requests_remaining == 59


@pytest.mark.anyio
async def test_tokens_bucket_charges_estimate_and_refunds_on_settlement(store: Store) -> None:
    key = await new_key(store, tpm=1000)
    first = await key.admit(T0, tokens=600, request_id="r1")
    assert first.admitted and first.tokens_remaining == 400
    refused = await key.admit(T0, tokens=600)
    assert refused.verdict == "tokens"
    assert refused.retry_after_ms == 12_000  # 200 tokens at 1000/60000 per ms
    assert await key.settle("r1", T0 + 1, prompt=50, completion=50)  # used 100 of 600
    assert float((await key.bucket())["t"]) == pytest.approx(900)
    assert (await key.admit(T0 + 1, tokens=600)).admitted


@pytest.mark.anyio
async def test_tokens_settlement_above_estimate_leaves_debt(store: Store) -> None:
    key = await new_key(store, tpm=1000)
    assert (await key.admit(T0, tokens=100, request_id="r1")).admitted
    await key.settle("r1", T0, prompt=700, completion=800)  # 1500 used, 100 estimated
    assert float((await key.bucket())["t"]) == pytest.approx(-500)
    refused = await key.admit(T0, tokens=100)
    assert refused.verdict == "tokens"
    assert refused.retry_after_ms == 36_000  # from -500 up to 100 at 1000 tokens/min


@pytest.mark.anyio
async def test_request_larger_than_bucket_passes_when_full_and_leaves_debt(store: Store) -> None:
    key = await new_key(store, tpm=1000)
    assert (await key.admit(T0, tokens=5000)).admitted
    assert float((await key.bucket())["t"]) == pytest.approx(-4000)
    assert (await key.admit(T0 + 60_000, tokens=10)).verdict == "tokens"


@pytest.mark.anyio
async def test_refusal_for_one_limit_consumes_nothing_from_the_others(store: Store) -> None:
    key = await new_key(store, rpm=10, tpm=100, credits=1000)
    assert (await key.admit(T0, tokens=50, cost=100)).admitted
    before_bucket, before_record = await key.bucket(), await key.record()
    assert (await key.admit(T0, tokens=80, cost=100)).verdict == "tokens"
    assert (await key.admit(T0, tokens=10, cost=5000)).verdict == "credits"
    assert await key.bucket() == before_bucket
    assert (await key.record())["reserved"] == before_record["reserved"] == "100"
    inflight = await store.client.zcard(keys_of.inflight_key(key.id))
    assert inflight == 1


@pytest.mark.anyio
async def test_concurrency_slots_are_held_until_settled_and_expire_after_lease(
    store: Store,
) -> None:
    key = await new_key(store, max_concurrency=2)
    assert (await key.admit(T0, request_id="a")).admitted
    assert (await key.admit(T0, request_id="b")).admitted
    refused = await key.admit(T0)
    assert refused.verdict == "concurrency"
    assert refused.retry_after_ms > 0
    await key.settle("a", T0 + 10)
    assert (await key.admit(T0 + 10, request_id="c")).admitted
    # A crashed proxy never settles "b" and "c": their leases run out.
    assert (await key.admit(T0 + 20)).verdict == "concurrency"
    assert (await key.admit(T0 + 10 + LEASE_MS)).admitted


@pytest.mark.anyio
async def test_credits_reserve_worst_case_and_charge_real_cost(store: Store) -> None:
    key = await new_key(store, credits=1000)
    assert (await key.admit(T0, cost=400, request_id="a")).admitted
    assert (await key.admit(T0, cost=400, request_id="b")).admitted
    assert (await key.admit(T0, cost=400)).verdict == "credits"  # 1000 - 800 < 400
    record = await key.record()
    assert (record["credits"], record["reserved"]) == ("1000", "800")
    await key.settle("a", T0, cost=150)
    record = await key.record()
    assert (record["credits"], record["reserved"]) == ("850", "400")
    assert (await key.admit(T0, cost=400)).admitted  # 850 - 400 >= 400


@pytest.mark.anyio
async def test_balance_at_or_below_zero_refuses_even_free_requests(store: Store) -> None:
    key = await new_key(store, credits=100)
    assert (await key.admit(T0, cost=100, request_id="a")).admitted
    await key.settle("a", T0, cost=130)  # the prompt was longer than estimated
    assert (await key.record())["credits"] == "-30"
    assert (await key.admit(T0, cost=0)).verdict == "credits"


@pytest.mark.anyio
async def test_racing_admissions_never_overdraw_credits(store: Store) -> None:
    key = await new_key(store, credits=1000)
    decisions = await asyncio.gather(*(key.admit(T0, cost=100) for _ in range(50)))
    assert sum(d.admitted for d in decisions) == 10
    assert (await key.record())["reserved"] == "1000"


@pytest.mark.anyio
async def test_settlement_is_idempotent_per_request_id(store: Store) -> None:
    key = await new_key(store, credits=1000, tpm=1000)
    assert (await key.admit(T0, tokens=100, cost=200, request_id="once")).admitted
    assert (await key.settle("once", T0, cost=50)).settled is True
    assert (await key.settle("once", T0 + 5, cost=50)).settled is False
    record = await key.record()
    assert (record["credits"], record["reserved"]) == ("950", "0")
    usage = await store.client.xlen(keys_of.usage_key(key.id))
    assert usage == 1


@pytest.mark.anyio
async def test_unknown_wrong_revoked_and_restricted_keys_are_refused(store: Store) -> None:
    key = await new_key(store, models=["gpt-4o-mini"])
    assert (await key.admit(T0, model="gpt-4o")).verdict == "model_not_allowed"
    assert (await key.admit(T0, model="gpt-4o-mini")).admitted
    impostor = Key(store, {"id": key.id, "key": f"sk-tg-{key.id}_{'x' * 43}"})
    assert (await impostor.admit(T0)).verdict == "unknown_key"
    stranger = Key(store, {"id": "0" * 16, "key": f"sk-tg-{'0' * 16}_{'y' * 43}"})
    assert (await stranger.admit(T0)).verdict == "unknown_key"
    await Keyring(store).revoke(key.id)
    assert (await key.admit(T0, model="gpt-4o-mini")).verdict == "revoked"


@pytest.mark.anyio
async def test_unpriced_model_is_refused_only_for_keys_with_a_balance(store: Store) -> None:
    metered = await new_key(store, credits=10_000)
    unmetered = await new_key(store)
    assert (await metered.admit(T0, cost=None)).verdict == "unpriced"
    assert (await unmetered.admit(T0, cost=None)).admitted


@pytest.mark.anyio
async def test_redis_clock_is_used_when_no_time_is_given(store: Store) -> None:
    key = await new_key(store, rpm=2)
    limiter = key.limiter
    for expected in ("ok", "ok", "requests"):
        decision = await limiter.admit(
            key.presented, request_id=secrets.token_hex(4), model="m", token_estimate=1,
            cost_micros=0,
        )  # fmt: skip
        assert decision.verdict == expected
    stamp = int((await key.bucket())["rt"])
    assert abs(stamp - int(await _redis_ms(store))) < 5_000


async def _redis_ms(store: Store) -> int:
    seconds, micros = await store.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_headers_follow_openai_names_and_formats() -> None:
    decision = Decision(
        verdict="ok", key_name="k", rpm=60, requests_remaining=59, requests_reset_ms=1000,
        tpm=40_000, tokens_remaining=38_976, tokens_reset_ms=360_000,
    )  # fmt: skip
    headers = {k.decode(): v.decode() for k, v in rate_limit_headers(decision)}
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] == "1s"
    assert headers["x-ratelimit-limit-tokens"] == "40000"
    assert headers["x-ratelimit-remaining-tokens"] == "38976"
    assert headers["x-ratelimit-reset-tokens"] == "6m0s"
    assert headers["ratelimit-policy"] == (
        '"requests";q=60;w=60, "tokens";q=40000;w=60;tollgate-unit="tokens"'
    )
    assert headers["ratelimit"] == '"requests";r=59;t=1, "tokens";r=38976;t=360'


def test_dimension_without_limit_sends_no_headers() -> None:
    headers = rate_limit_headers(Decision(verdict="ok", rpm=None, tpm=None))
    assert headers == []


@pytest.mark.anyio
async def test_scripts_are_reloaded_after_a_script_flush(store: Store) -> None:
    key = await new_key(store, rpm=5)
    assert (await key.admit(T0, request_id="before")).admitted
    await store.client.script_flush()
    assert (await key.admit(T0, request_id="after")).admitted
    assert await key.settle("after", T0)


async def _inflight_and_reserved(key: Key) -> tuple[list[str], dict[str, str]]:
    client = key.store.client
    inflight: list[str] = await client.zrange(keys_of.inflight_key(key.id), 0, -1)
    reserved: dict[str, str] = await client.hgetall(keys_of.reserved_key(key.id))
    return inflight, reserved


@pytest.mark.anyio
async def test_release_gives_back_slot_reservation_tokens_and_request_without_a_record(
    store: Store,
) -> None:
    key = await new_key(store, credits=1000, rpm=10, tpm=1000, max_concurrency=1)
    assert (await key.admit(T0, tokens=300, cost=400, request_id="lost")).admitted
    assert (await key.admit(T0, request_id="second")).verdict == "concurrency"
    assert await key.limiter.release(key.id, "lost") is True
    assert await _inflight_and_reserved(key) == ([], {})
    record = await key.record()
    assert (record["credits"], record["reserved"]) == ("1000", "0")
    bucket = await key.bucket()
    assert (float(bucket["r"]), float(bucket["t"])) == (10, 1000)  # full again
    assert await store.client.xlen(keys_of.usage_key(key.id)) == 0
    assert await store.client.hgetall(keys_of.aggregates_key(key.id)) == {}
    assert (await key.admit(T0, request_id="second")).admitted  # the slot is free


@pytest.mark.anyio
async def test_release_is_idempotent_and_a_later_settlement_records_nothing(store: Store) -> None:
    key = await new_key(store, credits=1000, tpm=1000)
    assert (await key.admit(T0, tokens=100, cost=200, request_id="lost")).admitted
    assert await key.limiter.release(key.id, "lost") is True
    assert await key.limiter.release(key.id, "lost") is False
    assert (await key.settle("lost", T0, cost=50)).settled is False  # a sweep of the same id, say
    record = await key.record()
    assert (record["credits"], record["reserved"]) == ("1000", "0")
    assert float((await key.bucket())["t"]) == 1000
    assert await store.client.xlen(keys_of.usage_key(key.id)) == 0


@pytest.mark.anyio
async def test_release_of_a_settled_or_never_admitted_id_changes_nothing(store: Store) -> None:
    key = await new_key(store, credits=1000, rpm=10, tpm=1000)
    assert (await key.admit(T0, tokens=100, cost=200, request_id="done")).admitted
    assert (await key.settle("done", T0, prompt=40, completion=20, cost=50)).settled is True
    before = (await key.record(), await key.bucket(), await _inflight_and_reserved(key))
    assert await key.limiter.release(key.id, "done") is False
    assert await key.limiter.release(key.id, "never") is False
    after = (await key.record(), await key.bucket(), await _inflight_and_reserved(key))
    assert after == before
    assert await store.client.xlen(keys_of.usage_key(key.id)) == 1
    settled = await store.client.zrange(keys_of.settled_key(key.id), 0, -1)
    assert settled == ["done"]  # "never" is not remembered: its admission may still land


@pytest.mark.anyio
async def test_release_of_a_key_without_limits_or_balance_frees_only_the_slot(
    store: Store,
) -> None:
    key = await new_key(store)
    assert (await key.admit(T0, request_id="lost")).admitted
    assert await key.limiter.release(key.id, "lost") is True
    assert await _inflight_and_reserved(key) == ([], {})
    assert await key.bucket() == {}
    assert (await key.record())["reserved"] == "0"
