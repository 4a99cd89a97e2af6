"""Budgets per UTC day, week and month: reserved at admission against what the period has
left, charged at settlement, released on release, reset at the period boundary; on every store
(fakeredis, redis-server, the real 3-master cluster), with time passed in."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from proxy import store as keys_of
from proxy.keys import Keyring
from proxy.periods import period_bounds
from proxy.store import Store
from tests.conftest import HELLO, Harness
from tests.test_limits import T0, Key, store  # noqa: F401  (store: the fixture)


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _bounds(period: str, now_ms: int) -> tuple[int, int]:
    start, end = period_bounds(period, datetime.fromtimestamp(now_ms / 1000, UTC))
    return _ms(start), _ms(end)


async def _budget_key(the_store: Store, amount: int, period: str, **fields: Any) -> Key:
    record = await Keyring(the_store).create(
        name="budgeted", limits={}, credits_micros=fields.get("credits"), allowed_models=None,
        metadata={}, budget=(amount, period),
    )  # fmt: skip
    return Key(the_store, record)


def test_periods_are_utc_calendar_days_monday_weeks_and_months() -> None:
    friday = datetime(2027, 1, 15, 8, tzinfo=UTC)
    assert period_bounds("day", friday) == (
        datetime(2027, 1, 15, tzinfo=UTC), datetime(2027, 1, 16, tzinfo=UTC)
    )  # fmt: skip
    assert period_bounds("week", friday) == (
        datetime(2027, 1, 11, tzinfo=UTC), datetime(2027, 1, 18, tzinfo=UTC)
    )  # fmt: skip
    assert period_bounds("month", datetime(2027, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2027, 12, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC)
    )  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_exhausted_budget_refuses_until_the_period_boundary(
    store: Store,  # noqa: F811
    period: str,
) -> None:
    key = await _budget_key(store, 100, period)
    start, end = _bounds(period, T0)
    first = await key.admit(T0, cost=60, request_id="a")
    assert first.verdict == "ok"
    assert (first.budget_micros, first.budget_resets_ms) == (100, end)
    refused = await key.admit(T0, cost=41)
    assert refused.verdict == "budget"
    assert refused.retry_after_ms == end - T0
    assert (await key.settle("a", T0, cost=60)).budget_spent_micros == 60
    assert (await key.admit(T0, cost=40, request_id="b")).verdict == "ok"
    assert (await key.admit(end - 1, cost=1)).verdict == "budget"
    # The next period starts empty, whatever the last one spent or still holds.
    fresh = await key.admit(end, cost=100, request_id="c")
    assert fresh.verdict == "ok"
    assert fresh.budget_spent_micros == 0
    record = await key.record()
    assert record["budget_start"] == str(end)
    assert record["budget_reserved"] == "100"
    # Request "b" was admitted in the last period: settling it now leaves this one alone.
    await key.settle("b", end, cost=40)
    record = await key.record()
    assert (record["budget_spent"], record["budget_reserved"]) == ("0", "100")
    assert start < end


@pytest.mark.anyio
async def test_settlement_charges_the_real_cost_and_release_gives_the_reservation_back(
    store: Store,  # noqa: F811
) -> None:
    key = await _budget_key(store, 100, "day")
    assert (await key.admit(T0, cost=80, request_id="r1")).verdict == "ok"
    assert (await key.admit(T0, cost=30)).verdict == "budget"
    await key.settle("r1", T0, cost=25)  # cheaper than the worst case
    record = await key.record()
    assert (record["budget_spent"], record["budget_reserved"]) == ("25", "0")
    assert (await key.admit(T0, cost=75, request_id="r2")).verdict == "ok"
    assert await key.limiter.release(key.id, "r2")
    record = await key.record()
    assert (record["budget_spent"], record["budget_reserved"]) == ("25", "0")
    assert await store.client.hlen(keys_of.reserved_key(key.id)) == 0
    assert (await key.admit(T0, cost=75)).verdict == "ok"


@pytest.mark.anyio
async def test_budget_and_balance_coexist_and_the_stricter_decides(
    store: Store,  # noqa: F811
) -> None:
    tight_budget = await _budget_key(store, 50, "month", credits=1000)
    assert (await tight_budget.admit(T0, cost=60)).verdict == "budget"
    tight_balance = await _budget_key(store, 1000, "month", credits=50)
    assert (await tight_balance.admit(T0, cost=60)).verdict == "credits"
    assert (await tight_balance.admit(T0, cost=40)).verdict == "ok"


@pytest.mark.anyio
async def test_forty_racing_requests_never_exceed_the_budget(store: Store) -> None:  # noqa: F811
    key = await _budget_key(store, 10 * 7, "day")  # room for exactly 7 requests of 10

    async def one(i: int) -> str:
        request_id = f"race-{i}-{secrets.token_hex(4)}"
        decision = await key.admit(T0, cost=10, request_id=request_id)
        if decision.admitted:
            await key.settle(request_id, T0, cost=10)
        return decision.verdict

    verdicts = await asyncio.gather(*(one(i) for i in range(40)))
    assert verdicts.count("ok") == 7
    assert verdicts.count("budget") == 33
    record = await key.record()
    assert (record["budget_spent"], record["budget_reserved"]) == ("70", "0")


def test_over_budget_is_402_budget_exceeded_with_reset_and_retry_after(
    harness: Harness,
) -> None:
    record = harness.create_key(budget={"amount": 0.000001, "period": "day"})
    assert record["budget"] == {"amount": 0.000001, "period": "day"}
    assert record["budget_spent"] == 0.0
    _, end = period_bounds("day", datetime.now(UTC))
    assert record["budget_resets_at"] == end.isoformat().replace("+00:00", "Z")
    response = harness.chat(record["key"], HELLO)
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "insufficient_credits"
    assert record["budget_resets_at"] in error["message"]
    left_s = (end - datetime.now(UTC)).total_seconds()
    assert abs(int(response.headers["retry-after"]) - left_s) <= 2
    assert int(response.headers["retry-after-ms"]) > 0
    body = harness.client.get("/metrics").text
    assert 'tollgate_credit_rejections_total{key="test",reason="budget"} 1.0' in body


def test_budget_spent_and_used_ratio_follow_settled_requests(harness: Harness) -> None:
    record = harness.create_key(budget={"amount": 1000, "period": "month"})
    assert harness.chat(record["key"], HELLO).status_code == 200
    shown = harness.admin("GET", f"/admin/keys/{record['id']}").json()
    assert shown["budget_spent"] > 0
    body = harness.client.get("/metrics").text
    ratio = [line for line in body.splitlines() if line.startswith("tollgate_budget_used_ratio{")]
    assert ratio == [f'tollgate_budget_used_ratio{{key="test"}} {shown["budget_spent"] / 1000}']


def test_patch_budget_sets_changes_and_removes_it(harness: Harness) -> None:
    record = harness.create_key()
    assert record["budget"] is None and record["budget_resets_at"] is None
    path = f"/admin/keys/{record['id']}"
    patched = harness.admin("PATCH", path, json={"budget": {"amount": 5, "period": "week"}})
    assert patched.json()["budget"] == {"amount": 5.0, "period": "week"}
    removed = harness.admin("PATCH", path, json={"budget": None})
    assert removed.json()["budget"] is None


@pytest.mark.parametrize(
    ("budget", "param"),
    [
        ("50/month", "budget"),
        ({"amount": 0, "period": "day"}, "budget.amount"),
        ({"amount": -1, "period": "day"}, "budget.amount"),
        ({"amount": 10**10, "period": "day"}, "budget.amount"),
        ({"amount": "5", "period": "day"}, "budget.amount"),
        ({"amount": 5, "period": "year"}, "budget.period"),
        ({"amount": 5}, "budget.period"),
        ({"amount": 5, "period": "day", "x": 1}, "budget"),
    ],
)
def test_bad_budget_is_400_naming_the_field(harness: Harness, budget: Any, param: str) -> None:
    response = harness.admin("POST", "/admin/keys", json={"name": "x", "budget": budget})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
