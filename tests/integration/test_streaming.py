"""Streaming through a real server: chunks are relayed as they arrive, a client that leaves
closes the upstream stream, a failure mid-stream ends it with one error event, and every
stream is billed (from upstream usage, or estimated where there is none).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.mock_upstream import REPLY
from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id
from tests.servers import wait_for

WORDS = [w + " " for w in REPLY.split(" ")[:-1]] + [REPLY.split(" ")[-1]]


def data_events(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE stream, one per event, as they arrive."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def chunk_content(event: str) -> str | None:
    choices = json.loads(event)["choices"]
    return choices[0]["delta"].get("content") if choices else None


def no_open_streams(mock: Mock) -> None:
    """Waits (bounded) until the mock has no stream open, e.g. one just finishing."""
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="no open upstream streams")


def gated_body() -> dict[str, Any]:
    return {"model": "mock-gated", "messages": MESSAGES, "stream": True}


@pytest.fixture
def streamer(stack: Stack, key: dict[str, Any]) -> Iterator[httpx.Client]:
    """Raw httpx for streams: every read waits at most 10 s, so a stuck relay fails fast."""
    timeout = httpx.Timeout(10, connect=5)
    with httpx.Client(
        base_url=stack.url, headers={"authorization": f"Bearer {key['key']}"}, timeout=timeout
    ) as client:
        yield client


def test_each_chunk_reaches_client_before_upstream_sends_the_next(
    streamer: httpx.Client, mock: Mock, stack: Stack, since: float
) -> None:
    no_open_streams(mock)
    request_id = new_request_id()
    with streamer.stream(
        "POST", "/v1/chat/completions", json=gated_body(), headers={"x-request-id": request_id}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-client-request-id"] == request_id
        events = data_events(response.iter_lines())
        # The opening chunk is sent before the gate; every later one waits for a release.
        assert chunk_content(next(events)) == ""
        assert mock.open_streams() == 1
        for word in WORDS[:4]:
            mock.release(1)
            assert chunk_content(next(events)) == word
        mock.release(len(WORDS) - 4)
        rest = list(events)

    assert "".join(chunk_content(e) or "" for e in rest[:-1]) == "".join(WORDS[4:])
    assert rest[-1] == "[DONE]"
    usage = json.loads(rest[-2])["usage"]
    record = stack.admin.record(request_id, since=since)
    assert record["usage_source"] == "upstream"
    assert record["stream"] is True
    assert record["status"] == 200
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"]
    assert record["ttft_ms"] is not None
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="the upstream stream to end")


def test_client_disconnect_mid_stream_closes_upstream_and_bills_an_estimate(
    stack: Stack, mock: Mock, since: float
) -> None:
    key = stack.admin.create_key(name="abandoned-stream", credits=1)
    no_open_streams(mock)
    request_id = new_request_id()
    headers = {"authorization": f"Bearer {key['key']}", "x-request-id": request_id}
    with (
        httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=gated_body()) as response,
    ):
        events = data_events(response.iter_lines())
        assert chunk_content(next(events)) == ""
        mock.release(1)
        assert chunk_content(next(events)) == WORDS[0]
        assert mock.open_streams() == 1
    # The client is gone and the gate stays shut: only Tollgate closing upstream ends it.
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="upstream stream closed")

    record = stack.admin.record(request_id, since=since)
    assert record["usage_source"] == "estimated"
    assert record["status"] == 499
    assert record["stream"] is True
    assert record["completion_tokens"] >= 1
    assert record["prompt_tokens"] >= 1
    usage = stack.admin.usage(key["id"], since=since)
    assert usage["groups"] == [
        {
            "model": "mock-gated",
            "requests": 1,
            "prompt_tokens": record["prompt_tokens"],
            "completion_tokens": record["completion_tokens"],
            "total_tokens": record["total_tokens"],
            "cost_usd": record["cost_usd"],
        }
    ]
    # The reservation was released and only what was streamed was charged.
    balance = stack.admin.key(key["id"])
    assert balance["reserved_credits"] == 0
    assert balance["credits"] == pytest.approx(1 - record["cost_usd"])
    assert record["cost_usd"] > 0


def test_disconnect_releases_concurrency_slot_of_a_limited_key(stack: Stack, mock: Mock) -> None:
    no_open_streams(mock)
    key = stack.admin.create_key(name="one-at-a-time", max_concurrency=1)
    headers = {"authorization": f"Bearer {key['key']}"}
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json=gated_body()) as response:
            # Keep the iterator: dropping it would close the connection (a disconnect).
            events = data_events(response.iter_lines())
            assert chunk_content(next(events)) == ""
            busy = client.post("/v1/chat/completions", json=body)
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        # Settlement follows the disconnect closely; retrying is bounded and refusals are free.
        wait_for(
            lambda: client.post("/v1/chat/completions", json=body).status_code == 200,
            timeout_s=10,
            what="the concurrency slot to come back",
        )


def test_failure_after_stream_began_ends_with_one_error_event_and_no_done(
    streamer: httpx.Client, stack: Stack, since: float
) -> None:
    request_id = new_request_id()
    body = {"model": "mock-drop", "messages": MESSAGES, "stream": True}
    with streamer.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    ) as response:
        assert response.status_code == 200
        events = list(data_events(response.iter_lines()))

    assert "[DONE]" not in events
    errors = [json.loads(e) for e in events if "error" in json.loads(e)]
    assert len(errors) == 1
    assert events[-1] == json.dumps(errors[0], separators=(",", ":"))
    assert errors[0]["error"]["type"] == "upstream_error"
    assert errors[0]["error"]["message"]
    # What came before the failure was relayed as it was.
    assert "".join(chunk_content(e) or "" for e in events[:-1]) == "".join(WORDS[:3])
    record = stack.admin.record(request_id, since=since)
    assert record["status"] == 502
    assert record["usage_source"] == "estimated"
    assert record["completion_tokens"] >= 1


def test_sdk_raises_api_error_when_stream_fails_midway(stack: Stack, key: dict[str, Any]) -> None:
    received: list[str] = []
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        stream = sdk.chat.completions.create(model="mock-drop", messages=MESSAGES, stream=True)
        with stream, pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "".join(WORDS[:3])
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "upstream_error"


def test_stream_without_upstream_usage_is_billed_as_estimate(
    streamer: httpx.Client, stack: Stack, since: float
) -> None:
    request_id = new_request_id()
    body = {"model": "mock-no-usage", "messages": MESSAGES, "stream": True}
    with streamer.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    ) as response:
        events = list(data_events(response.iter_lines()))

    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    record = stack.admin.record(request_id, since=since)
    assert record["status"] == 200
    assert record["usage_source"] == "estimated"
    assert record["completion_tokens"] == -(-len(REPLY) // 4)


def test_sdk_streams_are_recorded_with_upstream_usage(
    stack: Stack, key: dict[str, Any], since: float
) -> None:
    request_ids = [new_request_id(), new_request_id()]
    usages = []
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        for request_id in request_ids:
            with sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-request-id": request_id},
            ) as stream:
                chunks = list(stream)
            assert stream.response.headers["x-client-request-id"] == request_id
            assert chunks[-1].usage is not None
            usages.append(chunks[-1].usage)

    records = [stack.admin.record(r, since=since) for r in request_ids]
    for record, usage in zip(records, usages, strict=True):
        assert record["usage_source"] == "upstream"
        assert record["key_id"] == key["id"]
        assert record["model"] == "gpt-4o-mini"
        assert record["path"] == "/v1/chat/completions"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    totals = stack.admin.usage(key["id"], since=since)
    assert [g["model"] for g in totals["groups"]] == ["gpt-4o-mini"]
    assert totals["totals"]["requests"] == 2
    assert totals["totals"]["total_tokens"] == sum(u.total_tokens for u in usages)
    assert totals["totals"]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in records))
