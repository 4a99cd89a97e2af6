"""The official OpenAI SDK against a real `tollgate serve`: answers, streams, tools, multimodal
content and errors look to the client exactly as the upstream's (or SPEC §3's) would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id, running_stack
from tests.servers import UPSTREAM_KEY, RedisServer

MODEL = "gpt-4o-mini"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CHAT_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/api/chat/completions",
    "/api/v1/chat/completions",
    "/api/ai/chat/completions",
)


@pytest.fixture
def sdk(stack: Stack, key: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def upstream(mock: Mock) -> Iterator[openai.OpenAI]:
    """The same SDK straight at the mock upstream: what the proxy must reproduce."""
    with openai.OpenAI(base_url=mock.url, api_key=UPSTREAM_KEY, max_retries=0) as sdk:
        yield sdk


class Attempts:
    """Counts the HTTP requests an SDK client really sends (retries included)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: httpx2.Request) -> None:
        self.count += 1


@pytest.fixture
def attempts() -> Attempts:
    return Attempts()


def retrying_sdk(stack: Stack, api_key: str, attempts: Attempts) -> openai.OpenAI:
    """An SDK client with the default retry policy whose attempts are counted."""
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [attempts]})
    return openai.OpenAI(
        base_url=stack.url + "/v1", api_key=api_key, max_retries=2, http_client=http_client
    )


# --- answers -------------------------------------------------------------------------------


def test_sync_completion_equals_upstream_answer(
    sdk: openai.OpenAI, upstream: openai.OpenAI
) -> None:
    proxied = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    direct = upstream.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.choices[0].finish_reason == "stop"
    assert proxied.usage is not None and direct.usage is not None
    assert proxied.usage.model_dump() == direct.usage.model_dump()
    assert proxied._request_id


@pytest.mark.anyio
async def test_async_completion_equals_upstream_answer(
    stack: Stack, key: dict[str, Any], upstream: openai.OpenAI
) -> None:
    direct = upstream.chat.completions.create(model=MODEL, messages=MESSAGES)
    async with openai.AsyncOpenAI(
        base_url=stack.url + "/v1", api_key=key["key"], max_retries=0
    ) as sdk:
        proxied = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage is not None and direct.usage is not None
    assert proxied.usage.model_dump() == direct.usage.model_dump()


def test_sync_stream_joins_to_upstream_reply_and_ends_with_usage_chunk(
    sdk: openai.OpenAI, upstream: openai.OpenAI, mock: Mock
) -> None:
    direct = upstream.chat.completions.create(model=MODEL, messages=MESSAGES)
    request_id = new_request_id()
    with sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": request_id}
    ) as stream:
        chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    # The client did not ask for usage; Tollgate asked upstream, and the client sees it too.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and direct.usage is not None
    assert chunks[-1].usage.model_dump() == direct.usage.model_dump()
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    sent = mock.request_with_id(request_id)["body"]
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_async_stream_joins_to_upstream_reply_and_ends_with_usage_chunk(
    stack: Stack, key: dict[str, Any], upstream: openai.OpenAI
) -> None:
    direct = upstream.chat.completions.create(model=MODEL, messages=MESSAGES)
    async with openai.AsyncOpenAI(
        base_url=stack.url + "/v1", api_key=key["key"], max_retries=0
    ) as sdk:
        stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        async with stream:
            chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].usage is not None and direct.usage is not None
    assert chunks[-1].usage.model_dump() == direct.usage.model_dump()


def test_stream_with_client_usage_option_keeps_it_and_sends_one_usage_chunk(
    sdk: openai.OpenAI, mock: Mock
) -> None:
    request_id = new_request_id()
    with sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": request_id},
    ) as stream:
        chunks = list(stream)

    assert len([c for c in chunks if c.usage is not None]) == 1
    assert mock.request_with_id(request_id)["body"]["stream_options"] == {"include_usage": True}


def test_tool_call_comes_back_and_tool_message_follow_up_passes_through(
    sdk: openai.OpenAI, mock: Mock
) -> None:
    first = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    follow_up: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
    ]
    request_id = new_request_id()
    second = sdk.chat.completions.create(
        model=MODEL, messages=follow_up, extra_headers={"x-request-id": request_id}
    )

    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    assert mock.request_with_id(request_id)["body"]["messages"] == follow_up


def test_streamed_tool_call_arrives_with_finish_reason_tool_calls(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
    ) as stream:
        chunks = list(stream)

    calls = [
        call
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for call in c.choices[0].delta.tool_calls
    ]
    assert calls and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_multimodal_content_array_reaches_upstream_unchanged(
    sdk: openai.OpenAI, mock: Mock
) -> None:
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/cat.png", "detail": "high"},
                },
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}},
            ],
        }
    ]
    request_id = new_request_id()
    answer = sdk.chat.completions.create(
        model=MODEL, messages=messages, extra_headers={"x-request-id": request_id}
    )

    assert answer.choices[0].message.content
    assert mock.request_with_id(request_id)["body"]["messages"] == messages


def test_response_format_json_object_passes_through_and_answer_is_json(
    sdk: openai.OpenAI, mock: Mock
) -> None:
    request_id = new_request_id()
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        extra_headers={"x-request-id": request_id},
    )

    content = answer.choices[0].message.content
    assert content is not None
    assert isinstance(json.loads(content), dict)
    assert mock.request_with_id(request_id)["body"]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("params", "extra_body"),
    [
        pytest.param({"stop": "\n\n"}, {}, id="stop-string"),
        pytest.param({"stop": ["END", "STOP", "###", "\n"]}, {}, id="stop-four"),
        pytest.param({"n": 3}, {}, id="n"),
        pytest.param(
            {"frequency_penalty": -1.5, "presence_penalty": 2, "temperature": 0, "top_p": 0.5},
            {},
            id="penalties",
        ),
        pytest.param(
            {"seed": 7, "logit_bias": {"50256": -100}, "user": "u-1", "max_tokens": 5},
            {},
            id="sampling",
        ),
        pytest.param(
            {},
            {
                "top_k": 40,
                "repetition_penalty": 1.1,
                "transforms": {"order": ["a", "b"], "middle-out": False},
                "x_unicode": "naïve ☃ \u0000",
            },
            id="unknown-extra-fields",
        ),
    ],
)
def test_request_fields_reach_upstream_untouched(
    sdk: openai.OpenAI, mock: Mock, params: dict[str, Any], extra_body: dict[str, Any]
) -> None:
    request_id = new_request_id()
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        extra_body=extra_body,
        extra_headers={"x-request-id": request_id},
        **params,
    )

    assert answer.choices[0].message.content
    sent = mock.request_with_id(request_id)["body"]
    assert sent == {"model": MODEL, "messages": MESSAGES, **params, **extra_body}


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "api_key",
    [
        pytest.param("sk-tg-0123456789abcdef_" + "A" * 43, id="unknown"),
        pytest.param("sk-not-a-tollgate-key", id="malformed"),
    ],
)
def test_bad_key_raises_authentication_error_without_retry_or_upstream_call(
    stack: Stack, mock: Mock, attempts: Attempts, api_key: str
) -> None:
    before = len(mock.received())
    with (
        retrying_sdk(stack, api_key, attempts) as sdk,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "authentication_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert attempts.count == 1
    assert len(mock.received()) == before


def test_revoked_key_raises_authentication_error(
    stack: Stack, sdk: openai.OpenAI, key: dict[str, Any]
) -> None:
    assert sdk.chat.completions.create(model=MODEL, messages=MESSAGES).choices
    assert stack.admin.client.delete(f"/admin/keys/{key['id']}").status_code == 200

    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_model_outside_allowed_models_raises_permission_denied_without_retry(
    stack: Stack, mock: Mock, attempts: Attempts
) -> None:
    key = stack.admin.create_key(name="only-gpt-4o", allowed_models=["gpt-4o"])
    before = len(mock.received())
    with (
        retrying_sdk(stack, key["key"], attempts) as sdk,
        pytest.raises(openai.PermissionDeniedError) as caught,
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.code == "model_not_allowed"
    assert caught.value.param == "model"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert attempts.count == 1
    assert len(mock.received()) == before


def test_empty_balance_raises_402_status_error_without_retry(
    stack: Stack, mock: Mock, attempts: Attempts
) -> None:
    key = stack.admin.create_key(name="broke", credits=0)
    before = len(mock.received())
    with (
        retrying_sdk(stack, key["key"], attempts) as sdk,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_credits"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert attempts.count == 1
    assert len(mock.received()) == before


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"temperature": 3}, "temperature", None),
        ({"top_p": 1.5}, "top_p", None),
        ({"frequency_penalty": -2.5}, "frequency_penalty", None),
        ({"presence_penalty": 9}, "presence_penalty", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_completion_tokens": -5}, "max_completion_tokens", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"model": ""}, "model", "You must specify a model to call"),
        ({"messages": []}, "messages", "Messages array cannot be empty"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", None),
    ],
)
def test_invalid_request_raises_bad_request_naming_the_field(
    sdk: openai.OpenAI, mock: Mock, fields: dict[str, Any], param: str, message: str | None
) -> None:
    arguments: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, **fields}
    before = len(mock.received())
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**arguments)

    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    if message is not None:
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"] == message
    assert len(mock.received()) == before


@pytest.mark.parametrize("model", ["mock-error", "mock-bad-json"])
def test_upstream_failure_raises_status_error_502(sdk: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model=model, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.type == "upstream_error"


def test_upstream_4xx_is_passed_back_as_it_is(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="missing-model", messages=MESSAGES)

    assert caught.value.code == "model_not_found"
    assert caught.value.body == {
        "message": "The model `missing-model` does not exist",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


@pytest.fixture(scope="module")
def impatient(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A second proxy on the same store and upstream, with a 1-second upstream limit."""
    spool: Path = tmp_path_factory.mktemp("spool-impatient")
    with running_stack(redis_store, mock, spool, TOLLGATE_UPSTREAM_TIMEOUT="1") as stack:
        yield stack


def test_hanging_upstream_raises_504_with_the_configured_limit(
    impatient: Stack, since: float
) -> None:
    key = impatient.admin.create_key(name="impatient")
    request_id = new_request_id()
    with (
        openai.OpenAI(
            base_url=impatient.url + "/v1", api_key=key["key"], max_retries=0, timeout=30
        ) as sdk,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        sdk.chat.completions.create(
            model="mock-hang", messages=MESSAGES, extra_headers={"x-request-id": request_id}
        )

    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert caught.value.message == "Error code: 504 - Request timed out (1-second upstream limit)"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == "Request timed out (1-second upstream limit)"
    # A request that timed out upstream is still recorded.
    record = impatient.admin.record(request_id, since=since)
    assert record["status"] == 504


# --- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHAT_PATHS)
def test_chat_path_alias_answers_like_the_canonical_path(
    client: httpx.Client, stack: Stack, since: float, path: str
) -> None:
    request_id = new_request_id()
    body = {"model": MODEL, "messages": MESSAGES}
    response = client.post(path, json=body, headers={"x-request-id": request_id})

    assert response.status_code == 200, response.text
    assert response.headers["x-client-request-id"] == request_id
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["total_tokens"] > 0
    assert stack.mock.request_with_id(request_id)["body"] == body
    record = stack.admin.record(request_id, since=since)
    assert record["path"] == path
    assert record["route"] == "chat_completions"
    assert record["usage_source"] == "upstream"


@pytest.mark.parametrize("path", CHAT_PATHS)
def test_chat_path_alias_streams_like_the_canonical_path(client: httpx.Client, path: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("path", CHAT_PATHS)
def test_chat_path_alias_refuses_missing_key_with_401(stack: Stack, path: str) -> None:
    response = httpx.post(stack.url + path, json={"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 401
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-request-id"]
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_models_aliases_list_and_show_upstream_models(client: httpx.Client, prefix: str) -> None:
    listing = client.get(f"{prefix}/models")
    one = client.get(f"{prefix}/models/{MODEL}")
    missing = client.get(f"{prefix}/models/no-such-model")

    assert listing.status_code == 200
    assert listing.json()["object"] == "list"
    assert MODEL in [m["id"] for m in listing.json()["data"]]
    assert one.status_code == 200
    assert one.json()["id"] == MODEL
    assert missing.status_code == 404


def test_models_are_filtered_to_the_keys_allowed_models(stack: Stack) -> None:
    key = stack.admin.create_key(name="models-filter", allowed_models=["gpt-4o"])
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        ids = [m.id for m in sdk.models.list()]
        assert sdk.models.retrieve("gpt-4o").id == "gpt-4o"
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve(MODEL)

    assert ids == ["gpt-4o"]


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_embeddings_aliases_pass_through_and_are_metered(
    client: httpx.Client, stack: Stack, since: float, prefix: str
) -> None:
    request_id = new_request_id()
    body = {"model": "text-embedding-3-small", "input": "hello world"}
    response = client.post(f"{prefix}/embeddings", json=body, headers={"x-request-id": request_id})

    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    received = stack.mock.request_with_id(request_id)
    assert received["body"] == body
    assert received["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    record = stack.admin.record(request_id, since=since)
    assert record["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert record["usage_source"] == "upstream"


def test_sdk_embeddings_through_the_proxy(sdk: openai.OpenAI) -> None:
    answer = sdk.embeddings.create(model="text-embedding-3-small", input="hello")

    assert answer.data[0].embedding == [0.1, 0.2, 0.3]
    assert answer.usage.prompt_tokens > 0


def test_upstream_sees_the_operator_key_never_the_clients(
    sdk: openai.OpenAI, key: dict[str, Any], mock: Mock
) -> None:
    request_id = new_request_id()
    sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": request_id}
    )

    headers = mock.request_with_id(request_id)["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key["key"] not in json.dumps(headers)


def test_upstream_gets_tollgates_request_id_and_the_clients_beside_it(
    client: httpx.Client, mock: Mock
) -> None:
    request_id = new_request_id()
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"x-request-id": request_id},
    )

    assert response.headers["x-client-request-id"] == request_id
    upstream = mock.request_with_id(request_id)["headers"]
    assert upstream["x-request-id"] == response.headers["x-request-id"] != request_id
    assert upstream["x-client-request-id"] == request_id


def test_insane_client_request_id_is_replaced_everywhere(client: httpx.Client, mock: Mock) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"x-request-id": "no spaces/or slashes allowed"},
    )

    request_id = response.headers["x-request-id"]
    assert request_id != "no spaces/or slashes allowed"
    assert mock.request_with_id(request_id)["headers"]["x-request-id"] == request_id


@pytest.mark.parametrize("path", ["/v1/responses", "/api/v1/responses"])
def test_metered_surfaces_reach_the_upstream_only_with_a_key(
    client: httpx.Client, stack: Stack, mock: Mock, path: str, since: float
) -> None:
    before = len(mock.received())
    anonymous = httpx.post(stack.url + path, json={"model": MODEL, "input": "hi"})
    assert anonymous.status_code == 401
    assert len(mock.received()) == before

    proxied = client.post(path, json={"model": MODEL, "input": "hi"})
    request_id = proxied.headers["x-request-id"]
    assert proxied.status_code == 200, proxied.text
    upstream = mock.request_with_id(request_id)
    assert upstream["path"] == "/v1/responses"
    assert upstream["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert stack.admin.record(request_id, since=since)["status"] == 200


def test_health_readiness_and_metrics_answer(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as anonymous:
        health = anonymous.get("/healthz")
        ready = anonymous.get("/readyz")
        metrics = anonymous.get("/metrics")

    assert health.status_code == 200
    assert ready.status_code == 200
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "tollgate_inflight_requests" in metrics.text
    assert all(r.headers["x-request-id"] for r in (health, ready, metrics))
