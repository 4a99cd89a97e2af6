"""Usage queries: per-day/per-model aggregates and raw records read back as operators see them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.metering import Usage
from proxy.settlement import record, settlement
from proxy.usage import key_usage
from tests.conftest import Harness

PIPED_MODELS = ["a|b", "x|y|z", "x|y|z", "gpt-4o-mini", "|", "||edge|"]


def settle_requests(harness: Harness, models: list[str]) -> dict[str, Any]:
    record = harness.create_key()
    for model in models:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        assert harness.chat(record["key"], body).status_code == 200
    return record


def usage(harness: Harness, key_id: str, query: str) -> dict[str, Any]:
    response = harness.admin("GET", f"/admin/keys/{key_id}/usage?{query}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_models_with_pipes_are_reported_under_their_own_name(harness: Harness) -> None:
    record = settle_requests(harness, PIPED_MODELS)
    by_model = usage(harness, record["id"], "group_by=model")
    assert [(g["model"], g["requests"]) for g in by_model["groups"]] == [
        ("a|b", 1),
        ("gpt-4o-mini", 1),
        ("x|y|z", 2),
        ("|", 1),
        ("||edge|", 1),
    ]
    assert by_model["totals"]["requests"] == len(PIPED_MODELS)
    assert all(g["prompt_tokens"] > 0 and g["cost_usd"] > 0 for g in by_model["groups"])


def test_models_with_pipes_count_in_their_day(harness: Harness) -> None:
    record = settle_requests(harness, PIPED_MODELS)
    by_model = usage(harness, record["id"], "group_by=model")
    by_day = usage(harness, record["id"], "group_by=day")
    today = datetime.now(UTC).date().isoformat()
    assert [(g["day"], g["requests"]) for g in by_day["groups"]] == [(today, len(PIPED_MODELS))]
    assert by_day["totals"] == by_model["totals"]


def test_aggregates_and_raw_records_agree_for_models_with_pipes(harness: Harness) -> None:
    record = settle_requests(harness, PIPED_MODELS)
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    days = datetime(now.year, now.month, now.day, tzinfo=UTC)

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        store = harness.gateway.store
        whole = await key_usage(
            store, record["id"], since=days, until=days + timedelta(days=1), group_by="model"
        )
        raw = await key_usage(store, record["id"], since=start, until=end, group_by="model")
        return whole, raw

    whole, raw = harness.run(both)
    assert whole["groups"] == raw["groups"]
    assert whole["totals"] == raw["totals"]
    assert whole["totals"]["requests"] == len(PIPED_MODELS)


def test_a_record_replayed_days_later_is_dated_by_its_request(harness: Harness) -> None:
    """A settlement spooled during an outage and replayed two days later: windows over the
    request's own time find it (raw records and per-day aggregates), the replay day does not."""
    key = harness.create_key()
    requested = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2, hours=1)
    late = settlement(
        request_id="replayed-1", client_request_id=None, ts=requested.timestamp(),
        key_id=key["id"], key_name="k", model="gpt-4o-mini", route="chat_completions",
        path="/v1/chat/completions",
        stream=False, status=200, usage=Usage(10, 5, "upstream"), cost_micros=7,
        latency_s=0.1, ttft_s=0.05,
    )  # fmt: skip
    assert harness.run(record, harness.gateway.admission.limiter, late)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    assert harness.chat(key["key"], body).status_code == 200  # one on time, today

    def window(since: datetime, until: datetime) -> str:
        return f"since={since.timestamp():.3f}&until={until.timestamp():.3f}"

    around = window(requested - timedelta(minutes=1), requested + timedelta(minutes=1))
    answer = usage(harness, key["id"], "group_by=day&" + around)
    assert [(g["day"], g["requests"]) for g in answer["groups"]] == [
        (requested.date().isoformat(), 1)
    ]
    now = datetime.now(UTC)
    recent = usage(harness, key["id"], "group_by=day&" + window(now - timedelta(hours=1), now))
    assert recent["totals"]["requests"] == 1  # today's request only, not the replayed one
    day = requested.date()
    whole_day = usage(harness, key["id"], f"since={day}&until={day + timedelta(days=1)}")
    assert whole_day["totals"]["requests"] == 1
    exported = harness.admin("GET", "/admin/usage/export?" + around)
    assert [json.loads(line)["request_id"] for line in exported.text.splitlines()] == ["replayed-1"]
