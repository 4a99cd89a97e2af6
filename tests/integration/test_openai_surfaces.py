"""Responses, legacy Completions and Embeddings through a real `tollgate serve` on a real Redis:
the official SDK gets its answers, each request is reserved before it goes upstream (402, 429,
never an overdraft under concurrency) and billed exactly from the usage the upstream reports,
or from an estimate when the client leaves a stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from proxy.config import Settings
from proxy.credits import load_prices
from proxy.mock_upstream import REPLY
from proxy.surfaces.completions import Completions
from proxy.surfaces.embeddings import Embeddings
from proxy.surfaces.responses import Responses
from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id
from tests.servers import UPSTREAM_KEY, wait_for

MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
PRICES = load_prices(None)
TPM = 1_000_000
SURFACES = {
    "/v1/responses": Responses(),
    "/v1/completions": Completions(),
    "/v1/embeddings": Embeddings(),
}
# One request of each surface, JSON and stream, without an output limit (the default applies).
CASES = [
    pytest.param("/v1/responses", {"model": MODEL, "input": "Say hello"}, id="responses"),
    pytest.param(
        "/v1/responses",
        {"model": MODEL, "input": "Say hello", "stream": True},
        id="responses-stream",
    ),
    pytest.param("/v1/completions", {"model": MODEL, "prompt": "Say hello"}, id="completions"),
    pytest.param(
        "/v1/completions",
        {"model": MODEL, "prompt": "Say hello", "stream": True},
        id="completions-stream",
    ),
    pytest.param("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x" * 400}, id="embeddings"),
]


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def worst_case_micros(path: str, body: dict[str, Any]) -> int:
    """What admission reserves for this request: its estimate at the model's prices."""
    parsed = SURFACES[path].parse(json.dumps(body).encode(), Settings())
    return PRICES.cost_micros(parsed.model, parsed.prompt_estimate, parsed.completion_max)


def send(client: httpx.Client, path: str, body: dict[str, Any], request_id: str) -> httpx.Response:
    """One request, read to its end (a stream too)."""
    with client.stream("POST", path, json=body, headers={"x-request-id": request_id}) as response:
        response.read()
    return response


def assert_billed_exactly(
    stack: Stack,
    key: dict[str, Any],
    request_id: str,
    since: float,
    model: str,
    usage: tuple[int, int],
) -> None:
    """The record carries the upstream's usage, and the balance lost exactly its price."""
    record = stack.admin.record(request_id, since=since)
    assert record["usage_source"] == "upstream"
    assert (record["prompt_tokens"], record["completion_tokens"]) == usage
    cost = PRICES.cost_micros(model, *usage)
    assert cost > 0
    assert micros(record["cost_usd"]) == cost
    after = stack.admin.key(key["id"])
    assert micros(after["credits"]) == micros(key["credits"]) - cost
    assert after["reserved_credits"] == 0


def assert_reserved(headers: httpx.Headers, path: str, body: dict[str, Any]) -> None:
    """Admission took the request's estimate from the (full) tokens bucket of a TPM key."""
    parsed = SURFACES[path].parse(json.dumps(body).encode(), Settings())
    reserved = parsed.prompt_estimate + parsed.completion_max
    assert reserved > 0
    assert int(headers["x-ratelimit-remaining-tokens"]) == TPM - reserved


def assert_upstream_saw_only_the_operator_key(
    mock: Mock, request_id: str, key: dict[str, Any]
) -> dict[str, Any]:
    received = mock.request_with_id(request_id)
    assert received["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key["key"] not in json.dumps(received)
    return received


@pytest.fixture
def funded(stack: Stack) -> dict[str, Any]:
    return stack.admin.create_key(name="openai-surfaces", credits=1, tpm=TPM)


@pytest.fixture
def sdk(stack: Stack, funded: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=funded["key"], max_retries=0) as sdk:
        yield sdk


# --- the SDK, billed exactly ---------------------------------------------------------------


def test_sdk_responses_create_is_answered_and_billed_from_its_usage(
    sdk: openai.OpenAI, stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    raw = sdk.responses.with_raw_response.create(
        model=MODEL,
        input="Say hello",
        instructions="Be brief",
        extra_headers={"x-request-id": request_id},
    )
    answer = raw.parse()

    assert answer.output_text == REPLY
    assert answer.usage is not None
    assert answer.usage.input_tokens_details.cached_tokens == 0
    usage = (answer.usage.input_tokens, answer.usage.output_tokens)
    assert_billed_exactly(stack, funded, request_id, since, MODEL, usage)
    received = assert_upstream_saw_only_the_operator_key(stack.mock, request_id, funded)
    assert_reserved(raw.headers, "/v1/responses", received["body"])


def test_sdk_responses_stream_is_relayed_and_billed_from_its_completed_event(
    sdk: openai.OpenAI, stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    with sdk.responses.create(
        model=MODEL, input="Say hello", stream=True, extra_headers={"x-request-id": request_id}
    ) as stream:
        events = list(stream)

    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == REPLY
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    usage = (final.response.usage.input_tokens, final.response.usage.output_tokens)
    assert_billed_exactly(stack, funded, request_id, since, MODEL, usage)
    received = assert_upstream_saw_only_the_operator_key(stack.mock, request_id, funded)
    assert "stream_options" not in received["body"]  # the Responses API has none
    assert_reserved(stream.response.headers, "/v1/responses", received["body"])


def test_sdk_completions_create_is_answered_and_billed_from_its_usage(
    sdk: openai.OpenAI, stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    raw = sdk.completions.with_raw_response.create(
        model=MODEL, prompt="Say hello", max_tokens=50, extra_headers={"x-request-id": request_id}
    )
    answer = raw.parse()

    assert answer.choices[0].text == REPLY
    assert answer.usage is not None
    usage = (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert_billed_exactly(stack, funded, request_id, since, MODEL, usage)
    received = assert_upstream_saw_only_the_operator_key(stack.mock, request_id, funded)
    assert_reserved(raw.headers, "/v1/completions", received["body"])


def test_sdk_completions_stream_gets_a_usage_chunk_and_is_billed_from_it(
    sdk: openai.OpenAI, stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    with sdk.completions.create(
        model=MODEL, prompt="Say hello", stream=True, extra_headers={"x-request-id": request_id}
    ) as stream:
        chunks = list(stream)

    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    # The client did not ask for usage; Tollgate asked upstream, and the client sees it too.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    usage = (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    assert_billed_exactly(stack, funded, request_id, since, MODEL, usage)
    received = assert_upstream_saw_only_the_operator_key(stack.mock, request_id, funded)
    assert received["body"]["stream_options"] == {"include_usage": True}
    assert_reserved(stream.response.headers, "/v1/completions", received["body"])


def test_sdk_embeddings_create_is_billed_from_its_prompt_tokens(
    sdk: openai.OpenAI, stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    raw = sdk.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL,
        input=["x" * 4000, "y" * 4000],
        extra_headers={"x-request-id": request_id},
    )
    answer = raw.parse()

    assert answer.data[0].embedding == [0.1, 0.2, 0.3]
    usage = (answer.usage.prompt_tokens, 0)
    assert_billed_exactly(stack, funded, request_id, since, EMBEDDING_MODEL, usage)
    received = assert_upstream_saw_only_the_operator_key(stack.mock, request_id, funded)
    assert_reserved(raw.headers, "/v1/embeddings", received["body"])


@pytest.mark.parametrize("path", ["/api/v1/responses", "/api/v1/completions", "/api/v1/embeddings"])
def test_api_v1_forms_reach_the_same_surface(
    stack: Stack, funded: dict[str, Any], since: float, path: str
) -> None:
    body = {"model": MODEL, "input": "Say hello", "prompt": "Say hello"}
    request_id = new_request_id()
    headers = {"authorization": f"Bearer {funded['key']}", "x-request-id": request_id}
    response = httpx.post(stack.url + path, json=body, headers=headers, timeout=20)

    assert response.status_code == 200, response.text
    assert stack.mock.request_with_id(request_id)["path"] == path.removeprefix("/api")
    assert_reserved(response.headers, path.removeprefix("/api"), body)
    record = stack.admin.record(request_id, since=since)
    assert record["path"] == path
    assert record["usage_source"] == "upstream"
    usage = (record["prompt_tokens"], record["completion_tokens"])
    assert micros(record["cost_usd"]) == PRICES.cost_micros(MODEL, *usage)


# --- reserved before the upstream ----------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), CASES)
def test_worst_case_over_the_balance_is_402_before_the_upstream(
    stack: Stack, mock: Mock, path: str, body: dict[str, Any]
) -> None:
    # $0.0001 pays for what the mock answers, not for the default output limit's worst case
    # (1024 tokens at $0.60/M); an embedding's worst case is its input: 10,000 tokens here.
    if path == "/v1/embeddings":
        body = {**body, "input": "x" * 40_000}
    key = stack.admin.create_key(name="surface-402", credits=0.0001)
    assert worst_case_micros(path, body) > 100
    before = len(mock.received())
    headers = {"authorization": f"Bearer {key['key']}"}
    response = httpx.post(stack.url + path, json=body, headers=headers, timeout=20)

    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert response.headers["x-should-retry"] == "false"
    assert len(mock.received()) == before
    after = stack.admin.key(key["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (100, 0)


@pytest.mark.parametrize(("path", "body"), CASES)
def test_request_larger_than_the_tokens_left_is_429_while_another_holds_them(
    stack: Stack, mock: Mock, path: str, body: dict[str, Any]
) -> None:
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="no open upstream streams")
    key = stack.admin.create_key(name="surface-429", tpm=1000)
    holder = {"model": "mock-gated", "messages": MESSAGES, "stream": True, "max_tokens": 900}
    headers = {"authorization": f"Bearer {key['key']}"}
    with (
        httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=holder) as held,
    ):
        lines = held.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # holds ~910 tokens
        before = len(mock.received())
        if path == "/v1/embeddings":
            body = {**body, "input": "x" * 2000}  # 500 tokens
        response = client.post(path, json=body)

        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert "tokens per minute" in error["message"]
        assert int(response.headers["retry-after-ms"]) > 0
        assert len(mock.received()) == before
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="the held stream to close")


@pytest.mark.parametrize(("path", "body"), CASES)
def test_ten_concurrent_requests_never_overdraw_the_balance(
    stack: Stack, path: str, body: dict[str, Any], since: float
) -> None:
    if path == "/v1/embeddings":
        body = {**body, "input": "x" * 4000}
    else:
        body = {**body, "max_output_tokens" if path == "/v1/responses" else "max_tokens": 20}
    worst = worst_case_micros(path, body)
    start = 3 * worst + worst // 2
    key = stack.admin.create_key(name="surface-race", credits=start / 1_000_000)
    headers = {"authorization": f"Bearer {key['key']}"}
    with (
        httpx.Client(base_url=stack.url, headers=headers, timeout=20) as client,
        ThreadPoolExecutor(max_workers=10) as pool,
    ):
        ids = [new_request_id() for _ in range(10)]
        responses = list(pool.map(lambda rid: send(client, path, body, rid), ids))

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 402}, statuses
    served = [rid for rid, r in zip(ids, responses, strict=True) if r.status_code == 200]
    charged = sum(micros(stack.admin.record(rid, since=since)["cost_usd"]) for rid in served)
    after = stack.admin.key(key["id"])
    assert after["reserved_credits"] == 0
    assert micros(after["credits"]) == start - charged >= 0
    assert charged <= start


# --- streams the client leaves -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "text_of"),
    [
        pytest.param(
            "/v1/responses",
            {"model": "mock-gated", "input": "Say hello", "stream": True},
            lambda e: e.get("delta") if e.get("type") == "response.output_text.delta" else None,
            id="responses",
        ),
        pytest.param(
            "/v1/completions",
            {"model": "mock-gated", "prompt": "Say hello", "stream": True},
            lambda e: e["choices"][0]["text"] if e.get("choices") else None,
            id="completions",
        ),
    ],
)
def test_abandoned_stream_is_billed_499_from_its_estimate(
    stack: Stack, mock: Mock, since: float, path: str, body: dict[str, Any], text_of: Any
) -> None:
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="no open upstream streams")
    key = stack.admin.create_key(name="surface-abandoned", credits=1)
    request_id = new_request_id()
    headers = {"authorization": f"Bearer {key['key']}", "x-request-id": request_id}
    with (
        httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client,
        client.stream("POST", path, json=body) as response,
    ):
        assert response.status_code == 200
        mock.release(1)  # one word of the answer, then the client leaves
        texts = (
            text_of(json.loads(line[len("data: ") :]))
            for line in response.iter_lines()
            if line.startswith("data: ")
        )
        assert next(t for t in texts if t) == REPLY.split(" ")[0] + " "
    # The client is gone and the gate stays shut: only Tollgate closing upstream ends it.
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="upstream stream closed")

    record = stack.admin.record(request_id, since=since)
    assert (record["status"], record["usage_source"], record["stream"]) == (499, "estimated", True)
    estimate = SURFACES[path].parse(json.dumps(body).encode(), Settings()).prompt_estimate
    assert record["prompt_tokens"] == estimate
    assert record["completion_tokens"] == 2  # "Hello " streamed: 6 characters
    cost = PRICES.cost_micros("mock-gated", estimate, 2)
    assert micros(record["cost_usd"]) == cost > 0
    after = stack.admin.key(key["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (1_000_000 - cost, 0)
