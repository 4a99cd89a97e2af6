"""Anthropic Messages through a real `tollgate serve` on a real Redis, with the official
`anthropic` SDK as the client: answers and streams relayed, each request reserved before it goes
upstream (402, 429, never an overdraft under concurrency) and billed exactly from the usage the
upstream reports (cache tokens included), or from an estimate when the client leaves a stream;
refusals raise the SDK's own exception classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from proxy.config import Settings
from proxy.credits import load_prices
from proxy.mock_upstream import REPLY
from proxy.surfaces.anthropic import Messages
from tests.integration.conftest import Mock, Stack, new_request_id, running_mock, running_stack
from tests.servers import UPSTREAM_KEY, RedisServer, wait_for

MODEL = "claude-test"  # the default price: no cache prices, so every input token pays input
PRICES = load_prices(None)
TPM = 1_000_000
ANTHROPIC_KEY = "sk-ant-operator-integration"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
# The upstreams: the mock as an `anthropic` upstream (its root URL, as the Anthropic SDK takes
# it) for claude-* and mock-* models, and as an `openai` one for gpt-*.
REGISTRY = """
[upstreams.openai]
url = "{mock}/v1"
api_key_env = "OPENAI_UPSTREAM_KEY"
models = ["gpt-*"]

[upstreams.claude]
url = "{mock}"
api_key_env = "ANTHROPIC_UPSTREAM_KEY"
api = "anthropic"
models = ["claude-*", "mock-*"]
"""


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def worst_case_micros(body: dict[str, Any]) -> int:
    parsed = Messages().parse(json.dumps(body).encode(), Settings())
    return PRICES.cost_micros(parsed.model, parsed.prompt_estimate, parsed.completion_max)


def cached_system(tag: str) -> list[dict[str, Any]]:
    """A system prompt the mock caches: written the first time, read after."""
    text = f"You are a terse assistant ({tag}). " * 40
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


@pytest.fixture(scope="module")
def mock() -> Iterator[Mock]:
    """This module's own upstream: its gate and open streams are this module's alone."""
    with running_mock() as mock:
        yield mock


@pytest.fixture(scope="module")
def claude_stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("anthropic")
    registry = Path(directory / "upstreams.toml")
    registry.write_text(REGISTRY.format(mock=mock.root), encoding="utf-8")
    with running_stack(
        redis_store,
        mock,
        directory / "spool",
        TOLLGATE_UPSTREAMS=str(registry),
        OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
        ANTHROPIC_UPSTREAM_KEY=ANTHROPIC_KEY,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def default_stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """TOLLGATE_UPSTREAM_URL alone, as `tollgate demo` runs."""
    spool = tmp_path_factory.mktemp("spool-anthropic-default")
    with running_stack(redis_store, mock, spool) as stack:
        yield stack


@pytest.fixture
def funded(claude_stack: Stack) -> dict[str, Any]:
    return claude_stack.admin.create_key(name="anthropic-surface", credits=1, tpm=TPM)


def client_for(stack: Stack, key: str, key_form: str = "api_key") -> anthropic.Anthropic:
    """The SDK on Tollgate; `key_form` "x-api-key" sends the key in that header (as SDK
    versions before 2.x do), "api_key" as the SDK of this environment sends it."""
    if key_form == "x-api-key":
        return anthropic.Anthropic(
            base_url=stack.url, api_key=None, default_headers={"x-api-key": key}, max_retries=0
        )
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


@pytest.fixture(params=["api_key", "x-api-key"])
def sdk(
    claude_stack: Stack, funded: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[anthropic.Anthropic]:
    with client_for(claude_stack, funded["key"], request.param) as sdk:
        yield sdk


def assert_billed_exactly(
    stack: Stack, key: dict[str, Any], request_id: str, since: float, usage: Any
) -> dict[str, Any]:
    """The record carries every input token (cache writes and reads included) and the output,
    and the balance lost exactly its price."""
    record = stack.admin.record(request_id, since=since)
    assert record["usage_source"] == "upstream"
    written, read = usage.cache_creation_input_tokens or 0, usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + written + read
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, usage.output_tokens)
    details = {"cache_creation_input_tokens": written, "cache_read_input_tokens": read}
    assert record["usage_details"] == details
    cost = PRICES.cost_micros(MODEL, prompt, usage.output_tokens)
    assert micros(record["cost_usd"]) == cost > 0
    after = stack.admin.key(key["id"])
    assert after["reserved_credits"] == 0
    assert micros(after["credits"]) == micros(key["credits"]) - sum(
        micros(r["cost_usd"]) for r in stack.admin.export(since=since) if r["key_id"] == key["id"]
    )
    return record


def assert_upstream_saw_only_the_operator_key(
    mock: Mock, request_id: str, key: dict[str, Any]
) -> dict[str, Any]:
    received = mock.request_with_id(request_id)
    assert received["path"] == "/v1/messages"
    assert received["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in received["headers"]
    assert key["key"] not in json.dumps(received)
    return received


# --- the SDK, billed exactly ---------------------------------------------------------------


def test_sdk_messages_create_is_billed_from_its_usage_cache_tokens_included(
    sdk: anthropic.Anthropic, claude_stack: Stack, funded: dict[str, Any], since: float
) -> None:
    system = cached_system(new_request_id())
    usages = []
    for _ in range(2):  # the first writes the prompt cache, the second reads it
        request_id = new_request_id()
        message = sdk.messages.create(
            model=MODEL,
            max_tokens=64,
            system=system,  # type: ignore[arg-type]
            messages=MESSAGES,
            extra_headers={"x-request-id": request_id, "anthropic-version": "2023-06-01-client"},
        )
        assert message.content[0].type == "text" and message.content[0].text == REPLY
        usages.append(message.usage)
        assert_billed_exactly(claude_stack, funded, request_id, since, message.usage)
        received = assert_upstream_saw_only_the_operator_key(claude_stack.mock, request_id, funded)
        assert received["headers"]["anthropic-version"] == "2023-06-01-client"
    assert usages[0].cache_creation_input_tokens and not usages[0].cache_read_input_tokens
    assert usages[1].cache_read_input_tokens == usages[0].cache_creation_input_tokens


def test_sdk_messages_stream_is_relayed_and_billed_from_message_start_and_message_delta(
    sdk: anthropic.Anthropic, claude_stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    with sdk.messages.stream(
        model=MODEL,
        max_tokens=64,
        system=cached_system(request_id),  # type: ignore[arg-type]
        messages=MESSAGES,
        extra_headers={"x-request-id": request_id},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text == REPLY
    assert final.usage.cache_creation_input_tokens
    record = assert_billed_exactly(claude_stack, funded, request_id, since, final.usage)
    assert record["stream"] is True
    received = assert_upstream_saw_only_the_operator_key(claude_stack.mock, request_id, funded)
    assert received["body"]["stream"] is True
    sent = stream.response.request.headers["anthropic-version"]  # the SDK's own
    assert received["headers"]["anthropic-version"] == sent


def test_sdk_count_tokens_reaches_the_anthropic_upstream_and_is_free(
    sdk: anthropic.Anthropic, claude_stack: Stack, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    counted = sdk.messages.count_tokens(
        model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": request_id}
    )

    assert counted.input_tokens > 0
    received = claude_stack.mock.request_with_id(request_id)
    assert received["path"] == "/v1/messages/count_tokens"
    assert received["headers"]["x-api-key"] == ANTHROPIC_KEY
    record = claude_stack.admin.record(request_id, since=since)
    assert (record["prompt_tokens"], record["completion_tokens"], record["cost_usd"]) == (0, 0, 0)
    after = claude_stack.admin.key(funded["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (1_000_000, 0)


def test_upstream_url_alone_serves_the_sdk_through_its_default_upstream(
    default_stack: Stack, since: float
) -> None:
    """TOLLGATE_UPSTREAM_URL alone (as `tollgate demo` runs): the Anthropic route goes to the
    one upstream, below its URL, with the operator's key as that upstream takes it."""
    stack = default_stack
    key = stack.admin.create_key(name="anthropic-default", credits=1)
    request_id = new_request_id()
    with anthropic.Anthropic(base_url=stack.url, api_key=key["key"], max_retries=0) as sdk:
        message = sdk.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=MESSAGES,
            extra_headers={"x-request-id": request_id},
        )

    assert message.content[0].type == "text" and message.content[0].text == REPLY
    received = stack.mock.request_with_id(request_id)
    assert received["path"] == "/v1/messages"
    assert received["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key["key"] not in json.dumps(received)
    record = stack.admin.record(request_id, since=since)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )


# --- reserved before the upstream ----------------------------------------------------------


def test_worst_case_over_the_balance_is_402_before_the_upstream(
    claude_stack: Stack, mock: Mock
) -> None:
    # $0.0001 pays for what the mock answers, not for 1,000 output tokens at $2/M.
    key = claude_stack.admin.create_key(name="anthropic-402", credits=0.0001)
    assert worst_case_micros({"model": MODEL, "max_tokens": 1000, "messages": MESSAGES}) > 100
    before = len(mock.received())
    with (
        client_for(claude_stack, key["key"]) as sdk,
        pytest.raises(anthropic.APIStatusError) as refused,
    ):
        sdk.messages.create(model=MODEL, max_tokens=1000, messages=MESSAGES)

    assert refused.value.status_code == 402
    body = refused.value.body
    assert isinstance(body, dict) and set(body) == {"type", "error"}
    assert (body["type"], body["error"]["type"]) == ("error", "billing_error")
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(mock.received()) == before
    after = claude_stack.admin.key(key["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (100, 0)


def test_request_larger_than_the_tokens_left_is_429_while_another_holds_them(
    claude_stack: Stack, mock: Mock
) -> None:
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="no open upstream streams")
    key = claude_stack.admin.create_key(name="anthropic-429", tpm=1000)
    holder = {"model": "mock-gated", "max_tokens": 900, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": key["key"]}
    with (
        httpx.Client(base_url=claude_stack.url, headers=headers, timeout=10) as client,
        client.stream("POST", "/v1/messages", json=holder) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator closes the stream
        assert next(line for line in lines if line.startswith("data: "))  # holds ~910 tokens
        before = len(mock.received())
        with (
            client_for(claude_stack, key["key"]) as sdk,
            pytest.raises(anthropic.RateLimitError) as refused,
        ):
            sdk.messages.create(model=MODEL, max_tokens=200, messages=MESSAGES)

        error = refused.value.body["error"]  # type: ignore[index]
        assert error["type"] == "rate_limit_error"
        assert "tokens per minute" in error["message"]
        assert int(refused.value.response.headers["retry-after-ms"]) > 0
        assert len(mock.received()) == before
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="the held stream to close")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_ten_concurrent_requests_never_overdraw_the_balance(
    claude_stack: Stack, since: float, stream: bool
) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": MESSAGES, "stream": stream}
    worst = worst_case_micros(body)
    start = 3 * worst + worst // 2
    key = claude_stack.admin.create_key(name="anthropic-race", credits=start / 1_000_000)

    def send(request_id: str) -> httpx.Response:
        headers = {"x-api-key": key["key"], "x-request-id": request_id}
        with client.stream("POST", "/v1/messages", json=body, headers=headers) as response:
            response.read()
        return response

    with (
        httpx.Client(base_url=claude_stack.url, timeout=20) as client,
        ThreadPoolExecutor(max_workers=10) as pool,
    ):
        ids = [new_request_id() for _ in range(10)]
        responses = list(pool.map(send, ids))

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 402}, statuses
    assert all(
        r.json()["error"]["type"] == "billing_error" for r in responses if r.status_code == 402
    )
    served = [rid for rid, r in zip(ids, responses, strict=True) if r.status_code == 200]
    charged = sum(micros(claude_stack.admin.record(rid, since=since)["cost_usd"]) for rid in served)
    after = claude_stack.admin.key(key["id"])
    assert after["reserved_credits"] == 0
    assert micros(after["credits"]) == start - charged >= 0


# --- streams the client leaves, and streams that fail --------------------------------------


def test_abandoned_stream_is_billed_499_from_its_input_and_the_text_streamed(
    claude_stack: Stack, mock: Mock, since: float
) -> None:
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="no open upstream streams")
    key = claude_stack.admin.create_key(name="anthropic-abandoned", credits=1)
    request_id = new_request_id()
    body = {"model": "mock-gated", "max_tokens": 500, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": key["key"], "x-request-id": request_id}
    with (
        httpx.Client(base_url=claude_stack.url, headers=headers, timeout=10) as client,
        client.stream("POST", "/v1/messages", json=body) as response,
    ):
        assert response.status_code == 200
        mock.release(1)  # one word of the answer, then the client leaves
        events = (
            json.loads(line[len("data: ") :])
            for line in response.iter_lines()
            if line.startswith("data: ")
        )
        started = next(events)
        assert started["type"] == "message_start"
        delta = next(e for e in events if e["type"] == "content_block_delta")
        assert delta["delta"]["text"] == REPLY.split(" ")[0] + " "
    # The client is gone and the gate stays shut: only Tollgate closing upstream ends it.
    wait_for(lambda: mock.open_streams() == 0, timeout_s=10, what="upstream stream closed")

    record = claude_stack.admin.record(request_id, since=since)
    assert (record["status"], record["usage_source"], record["stream"]) == (499, "estimated", True)
    # The input message_start reported, and "Hello " streamed (6 characters: 2 tokens).
    usage = started["message"]["usage"]
    assert record["prompt_tokens"] == usage["input_tokens"] > 0
    assert record["completion_tokens"] == 2
    cost = PRICES.cost_micros("mock-gated", usage["input_tokens"], 2)
    assert micros(record["cost_usd"]) == cost > 0
    after = claude_stack.admin.key(key["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (1_000_000 - cost, 0)


def test_a_stream_cut_upstream_ends_with_an_error_event_the_sdk_raises(
    claude_stack: Stack, funded: dict[str, Any]
) -> None:
    with (
        client_for(claude_stack, funded["key"]) as sdk,
        pytest.raises(anthropic.APIStatusError) as failed,
        sdk.messages.stream(model="mock-drop", max_tokens=64, messages=MESSAGES) as stream,
    ):
        for _ in stream:
            pass

    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


# --- refusals raise the SDK's own classes --------------------------------------------------


def test_refusals_raise_the_sdks_exception_classes(
    claude_stack: Stack, funded: dict[str, Any]
) -> None:
    def raised(key: str, **fields: Any) -> anthropic.APIStatusError:
        body = {"model": MODEL, "max_tokens": 16, "messages": MESSAGES, **fields}
        with (
            client_for(claude_stack, key) as sdk,
            pytest.raises(anthropic.APIStatusError) as refused,
        ):
            sdk.messages.create(**body)
        return refused.value

    unknown = "sk-tg-" + "0123456789abcdef_" + "A" * 40
    assert isinstance(raised(unknown), anthropic.AuthenticationError)
    assert isinstance(raised(funded["key"], max_tokens=0), anthropic.BadRequestError)
    assert isinstance(raised(funded["key"], system=7), anthropic.BadRequestError)
    not_served = raised(funded["key"], model="gpt-4o")  # no anthropic upstream serves it
    assert isinstance(not_served, anthropic.NotFoundError)
    assert not_served.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert isinstance(raised(funded["key"], model="mock-error"), anthropic.InternalServerError)
    narrow = claude_stack.admin.create_key(name="anthropic-narrow", allowed_models=[MODEL], rpm=1)
    assert isinstance(raised(narrow["key"], model="claude-other"), anthropic.PermissionDeniedError)
    with client_for(claude_stack, narrow["key"]) as sdk:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    limited = raised(narrow["key"])
    assert isinstance(limited, anthropic.RateLimitError)
    assert int(limited.response.headers["retry-after"]) >= 1
