"""Usage totals over a mixed run equal what the upstream reported: streaming, non-streaming,
abandoned streams, upstream timeouts and upstream errors, one record per upstream request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mock, Stack, running_stack
from tests.servers import RedisServer, wait_for

MESSAGES = [{"role": "user", "content": "Count my tokens"}]


@pytest.fixture(scope="module")
def short_stack(redis_store: RedisServer, mock: Mock, tmp_path_factory: Any) -> Iterator[Stack]:
    spool: Path = tmp_path_factory.mktemp("spool")
    with running_stack(redis_store, mock, spool, TOLLGATE_UPSTREAM_TIMEOUT="1") as stack:
        yield stack


def _stream(client: httpx.Client, model: str, *, abandon: bool = False) -> tuple[str, Any]:
    """One streamed request; returns its request id and the usage chunk's usage (if any)."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        usage = None
        lines = response.iter_lines()
        for line in lines:
            if abandon:
                break  # leaving the block closes the connection mid-stream
            if line.startswith("data: {") and '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
    return request_id, usage


def test_usage_totals_equal_upstream_usage_over_a_mixed_run(short_stack: Stack) -> None:
    since = datetime.now(UTC)
    key = short_stack.admin.create_key(name="mixed-run", credits=10)
    upstream_usage: dict[str, dict[str, int]] = {}
    expected_ids: set[str] = set()
    headers = {"authorization": f"Bearer {key['key']}"}
    with httpx.Client(base_url=short_stack.url, headers=headers, timeout=20) as client:
        for _ in range(4):
            response = client.post(
                "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES}
            )
            assert response.status_code == 200
            upstream_usage[response.headers["x-request-id"]] = response.json()["usage"]
        for _ in range(3):
            request_id, usage = _stream(client, "gpt-4o")
            assert usage is not None
            upstream_usage[request_id] = usage
        abandoned, _ = _stream(client, "mock-gated", abandon=True)
        timed_out = client.post(
            "/v1/chat/completions", json={"model": "mock-hang", "messages": MESSAGES}
        )
        assert timed_out.status_code == 504
        failed = client.post(
            "/v1/chat/completions", json={"model": "mock-error", "messages": MESSAGES}
        )
        assert failed.status_code == 502
        expected_ids = set(upstream_usage) | {
            abandoned,
            timed_out.headers["x-request-id"],
            failed.headers["x-request-id"],
        }
    records: list[dict[str, Any]] = []

    def all_landed() -> bool:
        records[:] = [
            r for r in short_stack.admin.export(since=since.timestamp()) if r["key_id"] == key["id"]
        ]
        return {r["request_id"] for r in records} >= expected_ids

    wait_for(all_landed, timeout_s=15, what="every usage record")
    assert len(records) == len(expected_ids)  # exactly one record per upstream request
    by_id = {r["request_id"]: r for r in records}
    for request_id, usage in upstream_usage.items():
        record = by_id[request_id]
        assert record["usage_source"] == "upstream"
        assert record["prompt_tokens"] == usage["prompt_tokens"]
        assert record["completion_tokens"] == usage["completion_tokens"]
    assert by_id[abandoned]["usage_source"] == "estimated"
    assert by_id[abandoned]["status"] == 499
    timeout_record = by_id[timed_out.headers["x-request-id"]]
    assert (timeout_record["status"], timeout_record["usage_source"]) == (504, "estimated")
    failed_record = by_id[failed.headers["x-request-id"]]
    assert (failed_record["status"], failed_record["total_tokens"]) == (502, 0)

    # The admin API's totals: raw-record window and whole-day (aggregate) window agree.
    raw = short_stack.admin.usage(key["id"], since=since.timestamp())
    assert raw["totals"]["requests"] == len(records)
    assert raw["totals"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert raw["totals"]["completion_tokens"] == sum(r["completion_tokens"] for r in records)
    today = since.date()
    days = short_stack.admin.client.get(
        f"/admin/keys/{key['id']}/usage",
        params={
            "since": today.isoformat(),
            "until": (today + timedelta(days=1)).isoformat(),
            "group_by": "day",
        },
    ).json()
    assert days["totals"] == raw["totals"]
    charged = sum(round(r["cost_usd"] * 1_000_000) for r in records)
    after = short_stack.admin.key(key["id"])
    assert round(after["credits"] * 1_000_000) == 10_000_000 - charged
    assert after["reserved_credits"] == 0


def test_stream_past_the_deadline_ends_with_a_timeout_event_and_one_record(
    short_stack: Stack,
) -> None:
    since = datetime.now(UTC)
    key = short_stack.admin.create_key(name="stream-deadline", max_concurrency=1)
    headers = {"authorization": f"Bearer {key['key']}"}
    body = {"model": "mock-gated", "messages": MESSAGES, "stream": True}
    with (
        httpx.Client(base_url=short_stack.url, headers=headers, timeout=20) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["type"] == "upstream_timeout"
    assert error["message"] == "Request timed out (1-second upstream limit)"
    assert "data: [DONE]" not in events
    record = short_stack.admin.record(request_id, since=since.timestamp())
    assert (record["status"], record["usage_source"]) == (504, "estimated")
    # The slot is free again: the next request passes max_concurrency=1.
    with httpx.Client(base_url=short_stack.url, headers=headers, timeout=20) as client:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
