"""Bounds on what the admin API accepts, through a real `tollgate serve` on a real Redis:
balances stay where the Lua scripts' numbers are exact, bodies and fields stay small, and
usage reports keep model names that contain the aggregates' separator."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.integration.conftest import MESSAGES, Stack
from tests.integration.test_cli import tollgate

TOP_UP_USD = 300_000_000  # a third of the bound, less a little: three fit, a fourth does not


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_huge_top_ups_are_400_and_never_overflow(stack: Stack, key: dict[str, Any]) -> None:
    path = f"/admin/keys/{key['id']}/credits"
    for _ in range(10):
        response = stack.admin.client.post(path, json={"amount": 1e12})
        assert _error(response, 400)["param"] == "amount"
    assert stack.admin.key(key["id"])["credits"] is None


def test_racing_top_ups_never_together_pass_the_bound(stack: Stack, key: dict[str, Any]) -> None:
    path = f"/admin/keys/{key['id']}/credits"

    def top_up(_: int) -> int:
        with httpx.Client(base_url=stack.url, headers=stack.admin.client.headers) as admin:
            return admin.post(path, json={"amount": TOP_UP_USD}, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = sorted(pool.map(top_up, range(10)))
    assert statuses == [200] * 3 + [400] * 7
    assert stack.admin.key(key["id"])["credits"] == 3 * TOP_UP_USD


def test_cli_top_up_past_the_bound_fails_cleanly(stack: Stack, key: dict[str, Any]) -> None:
    done = tollgate("credits", "add", key["id"], "1e12", redis_url=stack.redis.url)
    assert done.returncode == 1
    assert done.stderr.startswith("tollgate: ")
    assert "Traceback" not in done.stderr
    assert tollgate("credits", "add", key["id"], "2.5", redis_url=stack.redis.url).returncode == 0
    assert stack.admin.key(key["id"])["credits"] == 2.5


def test_admin_body_of_5_mb_is_413_and_stores_nothing(stack: Stack) -> None:
    before = stack.admin.client.get("/admin/keys").json()["data"]
    body = {"name": "huge", "metadata": {"note": "x" * 5_000_000}}
    assert _error(stack.admin.client.post("/admin/keys", json=body), 413)["code"] == (
        "request_too_large"
    )

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "huge", "metadata": {"note": "'
        for _ in range(80):
            yield b"x" * 65_536
        yield b'"}}'

    response = stack.admin.client.post("/admin/keys", content=chunks())
    assert _error(response, 413)["code"] == "request_too_large"
    assert stack.admin.client.get("/admin/keys").json()["data"] == before


def test_oversized_metadata_and_models_are_400(stack: Stack, key: dict[str, Any]) -> None:
    path = f"/admin/keys/{key['id']}"
    for payload, param in (
        ({"metadata": {"note": "x" * 20_000}}, "metadata"),
        ({"allowed_models": ["m" * 257]}, "allowed_models"),
        ({"allowed_models": [f"m{i}" for i in range(1_001)]}, "allowed_models"),
    ):
        assert _error(stack.admin.client.patch(path, json=payload), 400)["param"] == param
    assert stack.admin.key(key["id"]) == {k: v for k, v in key.items() if k != "key"}


def test_usage_by_model_and_day_keeps_models_with_pipes(
    stack: Stack, key: dict[str, Any], client: httpx.Client, since: float
) -> None:
    models = ["a|b", "x|y|z", "x|y|z", "gpt-4o-mini"]
    for model in models:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES})
        assert response.status_code == 200, response.text
        request_id = response.headers["x-request-id"]
        assert stack.admin.record(request_id, since=since)["model"] == model
    # No since/until: the last 30 whole days, answered from the per-day aggregates.
    path = f"/admin/keys/{key['id']}/usage"
    by_model = stack.admin.client.get(path, params={"group_by": "model"}).json()
    assert [(g["model"], g["requests"]) for g in by_model["groups"]] == [
        ("a|b", 1),
        ("gpt-4o-mini", 1),
        ("x|y|z", 2),
    ]
    by_day = stack.admin.client.get(path, params={"group_by": "day"}).json()
    assert sum(g["requests"] for g in by_day["groups"]) == len(models)
    assert by_day["totals"] == by_model["totals"]
    assert by_model["totals"]["requests"] == len(models)
