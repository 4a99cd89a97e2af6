"""Per-model limits: buckets per (key, pattern) beside the key's own, in the admission script,
on every store (fakeredis, redis-server, the real 3-master cluster), with time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.keys import Keyring
from proxy.store import Store
from tests.conftest import HELLO, Harness
from tests.test_limits import T0, Key, store  # noqa: F401  (store: the fixture)


async def _key(the_store: Store, limits: list[Any], **key_limits: int) -> Key:
    record = await Keyring(the_store).create(
        name="k", limits=dict(key_limits), credits_micros=None, allowed_models=None,
        metadata={}, model_limits=limits,
    )  # fmt: skip
    return Key(the_store, record)


@pytest.mark.anyio
async def test_model_bucket_is_independent_of_the_keys_and_of_other_models(
    store: Store,  # noqa: F811
) -> None:
    key = await _key(store, [("gpt-4o", 2, None), ("gpt-4o*", 5, None)], rpm=4)
    verdicts = [(await key.admit(T0, model="gpt-4o")).verdict for _ in range(3)]
    assert verdicts == ["ok", "ok", "model_requests"]
    # gpt-4o-mini matches the second pattern, whose bucket is untouched; the key's has 2 left.
    mini = [(await key.admit(T0, model="gpt-4o-mini")).verdict for _ in range(3)]
    assert mini == ["ok", "ok", "requests"]
    refused = await key.admit(T0 + 30_000, model="gpt-4o")  # key bucket refilled 2
    assert refused.verdict == "ok"
    bucket = await key.bucket()
    assert float(bucket["m|gpt-4o|r"]) == 0
    assert float(bucket["m|gpt-4o*|r"]) == 3


@pytest.mark.anyio
async def test_model_tokens_are_settled_and_released_like_the_keys(
    store: Store,  # noqa: F811
) -> None:
    key = await _key(store, [("gpt-4o-mini", None, 100)])
    assert (await key.admit(T0, tokens=80, request_id="a")).verdict == "ok"
    refused = await key.admit(T0, tokens=30)
    assert (refused.verdict, refused.tpm, refused.tokens_remaining) == ("model_tokens", 100, 20)
    await key.settle("a", T0, prompt=5, completion=5)  # 10 used: 70 back
    assert float((await key.bucket())["m|gpt-4o-mini|t"]) == 90
    assert (await key.admit(T0, tokens=50, request_id="b")).verdict == "ok"
    assert await key.limiter.release(key.id, "b")
    assert float((await key.bucket())["m|gpt-4o-mini|t"]) == 90


@pytest.mark.anyio
async def test_headers_show_the_tighter_bucket_per_dimension(store: Store) -> None:  # noqa: F811
    key = await _key(store, [("gpt-4o-mini", 3, None)], rpm=100, tpm=1000)
    decision = await key.admit(T0, tokens=10)
    assert (decision.rpm, decision.requests_remaining) == (3, 2)
    assert (decision.tpm, decision.tokens_remaining) == (1000, 990)
    other = await key.admit(T0, tokens=10, model="gpt-4o")
    assert (other.rpm, other.requests_remaining) == (100, 98)


def test_model_limit_429_names_the_limit_and_headers_are_the_models(harness: Harness) -> None:
    record = harness.create_key(rpm=100, model_limits={"gpt-4o-mi*": {"rpm": 1}})
    assert record["model_limits"] == {"gpt-4o-mi*": {"rpm": 1, "tpm": None}}
    ok = harness.chat(record["key"], HELLO)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    refused = harness.chat(record["key"], HELLO)
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert "requests per minute of model 'gpt-4o-mini' (limit: 1)" in message
    assert int(refused.headers["retry-after"]) >= 1
    other = harness.chat(record["key"], {**HELLO, "model": "gpt-4o"})
    assert other.status_code == 200
    assert other.headers["x-ratelimit-limit-requests"] == "100"


def test_patch_model_limits_keeps_order_and_null_removes(harness: Harness) -> None:
    record = harness.create_key()
    path = f"/admin/keys/{record['id']}"
    limits = {"b*": {"rpm": 1, "tpm": None}, "a*": {"rpm": None, "tpm": 5}}
    patched = harness.admin("PATCH", path, json={"model_limits": limits})
    assert list(patched.json()["model_limits"].items()) == list(limits.items())
    assert harness.admin("PATCH", path, json={"model_limits": None}).json()["model_limits"] is None


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"x": 5},
        {"x": {"rpm": -1}},
        {"x": {"rpm": 1.5}},
        {"x": {"rps": 1}},
        {"": {"rpm": 1}},
        {"a\tb": {"rpm": 1}},
        {"x" * 257: {"rpm": 1}},
        {f"m{i}": {"rpm": 1} for i in range(65)},
    ],
)
def test_bad_model_limits_are_400(harness: Harness, value: Any) -> None:
    response = harness.admin("POST", "/admin/keys", json={"name": "x", "model_limits": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model_limits"
