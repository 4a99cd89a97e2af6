"""The mock upstream's fault switch (POST /_mock/fault) and its `x-mock-upstream` tag: every
generating route fails alike, in its dialect's error shape, while the model list and the
inspection routes keep answering and every faulted request is still recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.mock_upstream import MockState, create_mock_upstream

pytestmark = pytest.mark.anyio

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
# Every generating route with a body it answers with 200 when no fault is set, and whether it
# speaks Anthropic's error shape.
ROUTES: list[tuple[str, dict[str, Any], bool]] = [
    ("/v1/chat/completions", CHAT, False),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, False),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "hi"}, False),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, False),
    ("/v1/messages", MESSAGE, True),
    ("/v1/messages/count_tokens", MESSAGE, True),
]


@pytest.fixture
async def mock() -> AsyncIterator[httpx.AsyncClient]:
    app = create_mock_upstream(MockState(), tag="primary")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


async def fault(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/_mock/fault", json=spec)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def recorded_paths(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/_mock/requests")
    return [r["path"] for r in response.json()["requests"]]


@pytest.mark.parametrize("status", [503, 500, 429])
async def test_status_fault_fails_every_generating_route_in_its_dialect(
    mock: httpx.AsyncClient, status: int
) -> None:
    assert (await fault(mock, {"status": status}))["fault"]["status"] == status

    for path, body, anthropic in ROUTES:
        response = await mock.post(path, json=body)
        assert response.status_code == status, path
        answer = response.json()
        if anthropic:
            assert answer["type"] == "error", path
            assert set(answer["error"]) == {"type", "message"}
        else:
            assert set(answer) == {"error"}, path
            assert answer["error"]["code"] is None
        assert str(status) in answer["error"]["message"]
        assert answer["error"]["type"] != ""
        assert response.headers.get("retry-after") == ("1" if status == 429 else None)
        assert response.headers["x-mock-upstream"] == "primary"
    assert await recorded_paths(mock) == [path for path, _, _ in ROUTES]


async def test_fault_leaves_the_model_list_alone(mock: httpx.AsyncClient) -> None:
    await fault(mock, {"status": 503})

    response = await mock.get("/v1/models")

    assert response.status_code == 200
    assert "gpt-4o-mini" in [m["id"] for m in response.json()["data"]]


async def test_counted_fault_fails_only_the_next_requests(mock: httpx.AsyncClient) -> None:
    await fault(mock, {"status": 503, "count": 2})

    statuses = [(await mock.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]

    assert statuses == [503, 503, 200, 200]
    state = (await mock.get("/_mock/requests")).json()
    assert state["fault"] is None
    assert len(state["requests"]) == 4


async def test_empty_fault_heals(mock: httpx.AsyncClient) -> None:
    await fault(mock, {"status": 503})
    assert (await mock.post("/v1/chat/completions", json=CHAT)).status_code == 503

    assert (await fault(mock, {}))["fault"] is None

    response = await mock.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


async def test_stall_never_answers_but_blocks_nothing_else(mock: httpx.AsyncClient) -> None:
    await fault(mock, {"stall": True, "count": 1})

    stalled = asyncio.create_task(mock.post("/v1/chat/completions", json=CHAT))
    await asyncio.sleep(0.2)
    try:
        assert not stalled.done()
        assert await recorded_paths(mock) == ["/v1/chat/completions"]
        assert (await mock.get("/v1/models")).status_code == 200
        # The count is spent: the next request is answered while the first still hangs.
        assert (await mock.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert not stalled.done()
    finally:
        stalled.cancel()


@pytest.mark.parametrize(
    "spec",
    [
        {"status": 200},
        {"status": "503"},
        {"status": 503, "stall": True},
        {"stall": "yes"},
        {"count": 2},
        {"status": 503, "count": 0},
        {"status": 503, "name": "primary"},
        [],
    ],
)
async def test_malformed_fault_is_refused_and_changes_nothing(
    mock: httpx.AsyncClient, spec: Any
) -> None:
    response = await mock.post("/_mock/fault", json=spec)

    assert response.status_code == 400
    assert (await mock.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_recorded_request_carries_the_sha256_of_its_exact_bytes(
    mock: httpx.AsyncClient,
) -> None:
    raw = b'{ "model" : "gpt-4o-mini",\n "messages": [] }'

    await mock.post("/v1/chat/completions", content=raw)

    (seen,) = (await mock.get("/_mock/requests")).json()["requests"]
    assert seen["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert seen["body"] == {"model": "gpt-4o-mini", "messages": []}


async def test_untagged_mock_sends_no_tag_header() -> None:
    transport = httpx.ASGITransport(app=create_mock_upstream())
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        response = await client.post("/v1/chat/completions", json=CHAT)

    assert response.status_code == 200
    assert "x-mock-upstream" not in response.headers
