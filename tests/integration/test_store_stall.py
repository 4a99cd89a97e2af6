"""A Redis stall under load, through the whole proxy: every request that reached the upstream
has exactly one usage record, and a request that did not (its admission's reply was lost, the
client got 503) leaves no record, no charge, no slot and no reservation."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import store as keys_of
from tests.integration.conftest import MESSAGES, Mock, Stack, running_stack
from tests.servers import RedisServer, redis_server, wait_for

CLIENTS = 16
DURATION_S = 6.0
STALL_S = 2.5


@pytest.fixture
def stalled_stack(mock: Mock, tmp_path: Path) -> Iterator[Stack]:
    with redis_server() as own, running_stack(own, mock, tmp_path / "spool") as stack:
        yield stack


def _traffic(stack: Stack, key: str, prefix: str, stop_at: float) -> list[tuple[int, str]]:
    answers: list[tuple[int, str]] = []
    with httpx.Client(
        base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        while time.monotonic() < stop_at:
            client_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
            response = client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES},
                headers={"x-client-request-id": client_id},
            )
            answers.append((response.status_code, response.headers["x-request-id"]))
    return answers


def test_a_redis_stall_charges_and_records_only_what_reached_the_upstream(
    stalled_stack: Stack, mock: Mock
) -> None:
    stack = stalled_stack
    redis: RedisServer = stack.redis
    record = stack.admin.create_key(name="stall", credits=100)
    since = time.time()
    prefix = "stall-" + uuid.uuid4().hex[:8]
    stop_at = time.monotonic() + DURATION_S
    results: list[list[tuple[int, str]]] = [[] for _ in range(CLIENTS)]

    def client(index: int) -> None:
        results[index] = _traffic(stack, record["key"], prefix, stop_at)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    redis.cli("debug", "sleep", str(STALL_S))  # blocks this thread for the stall
    for thread in threads:
        thread.join(timeout=60)

    answers = [answer for per_client in results for answer in per_client]
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0, "the stall refused nothing: it did not bite"

    upstream_ids = {
        r["headers"]["x-request-id"]
        for r in mock.received()
        if r["headers"].get("x-client-request-id", "").startswith(prefix)
    }
    answered_ok = {request_id for status, request_id in answers if status == 200}
    assert answered_ok <= upstream_ids

    def settled() -> bool:
        fields: dict[str, str] = redis_hash(stack, keys_of.record_key(record["id"]))
        inflight = int(redis.cli("zcard", keys_of.inflight_key(record["id"])))
        return inflight == 0 and fields.get("reserved") == "0"

    wait_for(settled, timeout_s=20, what="every slot and reservation released")
    records: list[dict[str, Any]] = [
        r for r in stack.admin.export(since=since) if r["key_id"] == record["id"]
    ]
    recorded_ids = [r["request_id"] for r in records]
    print(
        f"\nstall {STALL_S} s under {CLIENTS} clients: {dict(statuses)} answers, "
        f"{len(upstream_ids)} upstream requests, {len(records)} usage records"
    )
    assert len(recorded_ids) == len(set(recorded_ids))
    assert set(recorded_ids) == upstream_ids
    refused = {request_id for status, request_id in answers if status == 503}
    assert not refused & set(recorded_ids)
    charged = sum(r["cost_usd"] for r in records)
    assert stack.admin.key(record["id"])["credits"] == pytest.approx(100 - charged, abs=1e-5)


def redis_hash(stack: Stack, name: str) -> dict[str, str]:
    lines = stack.redis.cli("hgetall", name).splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=True))
