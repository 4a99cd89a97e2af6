"""Budgets through the OpenAI SDK against a real `tollgate serve` on a real redis-server:
402 budget_exceeded with the reset time, and 40 racing requests that never exceed a budget."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.integration.conftest import MESSAGES, Stack

MODEL = "gpt-4o-mini"


def test_budget_exhausted_is_402_budget_exceeded_through_the_sdk(stack: Stack) -> None:
    key = stack.admin.create_key(budget={"amount": 0.000001, "period": "week"})
    sdk = openai.OpenAI(base_url=stack.url + "/v1", api_key=key["key"], max_retries=0)
    with sdk, pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert refused.value.status_code == 402
    body: Any = refused.value.body
    assert body["code"] == "budget_exceeded"
    assert key["budget_resets_at"] in body["message"]
    assert int(refused.value.response.headers["retry-after"]) > 0


def test_forty_racing_requests_never_exceed_the_budget(stack: Stack) -> None:
    key = stack.admin.create_key(budget={"amount": 0.00005, "period": "day"})

    def one(_: int) -> int:
        with httpx.Client(base_url=stack.url, timeout=20) as client:
            response = client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {key['key']}"},
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 20},
            )
        return response.status_code

    with ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(pool.map(one, range(40)))
    assert set(statuses) == {200, 402}
    assert statuses.count(200) >= 1
    record = stack.admin.key(key["id"])
    assert 0 < record["budget_spent"] <= 0.00005
    assert record["reserved_credits"] == 0


def test_a_request_with_budget_expiry_and_model_limit_costs_one_evalsha_each_way(
    stack: Stack,
) -> None:
    key = stack.admin.create_key(
        budget={"amount": 100, "period": "month"},
        expires_at="2999-01-01T00:00:00Z",
        model_limits={"gpt-4o*": {"rpm": 1000, "tpm": 10**6}},
        rpm=1000,
    )
    store = redis.Redis.from_url(stack.redis.url, decode_responses=True)

    def evalsha_calls() -> int:
        stats: Any = store.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    with httpx.Client(base_url=stack.url, timeout=20) as client:
        for _ in range(10):
            response = client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {key['key']}"},
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
            )
            assert response.status_code == 200
    deadline = time.monotonic() + 5  # the last settlement may land just after its answer
    while evalsha_calls() - before < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert evalsha_calls() - before == 20  # admission and settlement, one script each
    assert stack.admin.key(key["id"])["budget_spent"] > 0
    store.close()
