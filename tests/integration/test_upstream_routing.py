"""Several upstreams through a real `tollgate serve` on a real Redis, each upstream a real mock
process (a refusing one is a port nobody listens on): `name/model` and pattern routing, fallback
before the first byte (refused, 5xx, 429, a stalled attempt) and never after it, the `provider`
object, passive health, one charge at the answering upstream's price, and the metrics that show
each move. The official `openai` SDK is the client; raw httpx where statuses and headers matter.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.mock_upstream import REPLY
from tests.admin_client import Admin
from tests.integration.conftest import MESSAGES, Mock, new_request_id, running_mock
from tests.servers import (
    ProxyServer,
    RedisServer,
    free_port,
    proxy_server,
    tollgate_env,
    wait_for,
)

MODEL = "gpt-4o-mini"
# Each upstream's own operator key: whichever upstream a request reaches gets its own.
KEYS = {
    "PRIMARY_UPSTREAM_KEY": "sk-primary-operator-secret",
    "BACKUP_UPSTREAM_KEY": "sk-backup-operator-secret",
    "THIRD_UPSTREAM_KEY": "sk-third-operator-secret",
    "DEAD_UPSTREAM_KEY": "sk-dead-operator-secret",
    "CLAUDE_A_UPSTREAM_KEY": "sk-ant-a-operator-secret",
    "CLAUDE_B_UPSTREAM_KEY": "sk-ant-b-operator-secret",
}
# `dead` refuses connections and is the first openai upstream (where pass-through goes);
# gpt-*, mock-* and text-embedding-* go to primary then backup, shared-* to primary, backup,
# third; claude-* (the Anthropic route) to claude_a then claude_b (the same two mock processes).
ROUTING = """
[upstreams.dead]
url = "{dead}"
api_key_env = "DEAD_UPSTREAM_KEY"
models = ["viadead-*"]
priority = 0

[upstreams.primary]
url = "{primary}"
api_key_env = "PRIMARY_UPSTREAM_KEY"
models = ["gpt-*", "mock-*", "shared-*", "text-embedding-*"]
priority = 1

[upstreams.backup]
url = "{backup}"
api_key_env = "BACKUP_UPSTREAM_KEY"
models = ["gpt-*", "mock-*", "shared-*", "text-embedding-*", "viadead-*", "meta-llama/*"]
priority = 2

[upstreams.third]
url = "{third}"
api_key_env = "THIRD_UPSTREAM_KEY"
models = ["shared-*", "third-*"]
priority = 3

[upstreams.claude_a]
url = "{primary_root}"
api_key_env = "CLAUDE_A_UPSTREAM_KEY"
api = "anthropic"
models = ["claude-*"]
priority = 1

[upstreams.claude_b]
url = "{backup_root}"
api_key_env = "CLAUDE_B_UPSTREAM_KEY"
api = "anthropic"
models = ["claude-*"]
priority = 2
"""
# USD per million tokens. No [default]: a model priced nowhere is unpriced.
PRICES = {
    "gpt-4o-mini": (0.15, 0.60),
    "backup/gpt-4o-mini": (3.00, 6.00),  # backup's own price of the same model
    "primary/shared-x": (1.00, 2.00),  # shared-x has a price at primary only
    "viadead-mini": (0.50, 1.00),
}
ATTEMPT_TIMEOUT_S = 1.0
UPSTREAM_TIMEOUT_S = 4.0
# The health proxy: two failures in a row open an upstream for a short cool-down. Each test
# uses upstreams of its own names (health is per upstream name), several on one mock process.
THRESHOLD = 2
COOLDOWN_S = 1.5
HEALTH_MAX_ATTEMPTS = 2
HEALTH = """
[upstreams.flaky_a]
url = "{primary}"
models = ["ha-*"]
priority = 1

[upstreams.steady_a]
url = "{backup}"
models = ["ha-*"]
priority = 2

[upstreams.flaky_b]
url = "{primary}"
models = ["hb-*"]
priority = 1

[upstreams.steady_b]
url = "{backup}"
models = ["hb-*"]
priority = 2

[upstreams.flaky_p]
url = "{primary}"
models = ["hp-*"]
priority = 1
attempt_timeout = 1

[upstreams.steady_p]
url = "{backup}"
models = ["hp-*"]
priority = 2

[upstreams.lonely]
url = "{primary}"
models = ["hc-*"]

[upstreams.flaky_d]
url = "{primary}"
models = ["hd-*"]
priority = 1

[upstreams.steady_d]
url = "{backup}"
models = ["hd-*"]
priority = 2

[upstreams.m1]
url = "{primary}"
models = ["hm-*"]
priority = 1

[upstreams.m2]
url = "{primary}"
models = ["hm-*"]
priority = 2

[upstreams.m3]
url = "{backup}"
models = ["hm-*"]
priority = 3

[upstreams.quick]
url = "{primary}"
models = ["hq-*"]
priority = 1
attempt_timeout = 0.5
connect_timeout = 2

[upstreams.steady_q]
url = "{backup}"
models = ["hq-*"]
priority = 2
"""


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def cost_micros(price: str, prompt_tokens: int, completion_tokens: int) -> int:
    """What these tokens cost at the price listed under `price`, rounded up to a micro-dollar."""
    input_usd, output_usd = PRICES[price]
    scaled = prompt_tokens * micros(input_usd) + completion_tokens * micros(output_usd)
    return -(-scaled // 1_000_000)


def prices_toml() -> str:
    return "".join(
        f'[models."{name}"]\ninput = {i}\noutput = {o}\n\n' for name, (i, o) in PRICES.items()
    )


# --- the servers ---------------------------------------------------------------------------


@dataclass
class Upstreams:
    primary: Mock
    backup: Mock
    third: Mock
    dead: str  # a URL nothing listens on

    @property
    def mocks(self) -> tuple[Mock, ...]:
        return (self.primary, self.backup, self.third)

    def registry(self, template: str) -> str:
        return template.format(
            dead=self.dead,
            primary=self.primary.url,
            backup=self.backup.url,
            third=self.third.url,
            primary_root=self.primary.root,
            backup_root=self.backup.root,
        )


@dataclass
class Proxy:
    url: str
    admin: Admin


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    with (
        running_mock("primary") as primary,
        running_mock("backup") as backup,
        running_mock("third") as third,
    ):
        yield Upstreams(primary, backup, third, dead=f"http://127.0.0.1:{free_port()}/v1")


@pytest.fixture(autouse=True)
def healed(upstreams: Upstreams) -> Iterator[None]:
    """Every test starts and ends with every mock answering normally."""
    for mock in upstreams.mocks:
        mock.clear_fault()
    yield
    for mock in upstreams.mocks:
        mock.clear_fault()


def running_proxy(
    redis: RedisServer, upstreams: Upstreams, directory: Path, registry: str, **settings: str
) -> AbstractContextManager[ProxyServer]:
    """`tollgate serve` with this registry (of the mocks' URLs) and the module's prices."""
    (directory / "upstreams.toml").write_text(upstreams.registry(registry), encoding="utf-8")
    (directory / "prices.toml").write_text(prices_toml(), encoding="utf-8")
    env = tollgate_env(
        redis_url=redis.url,
        upstream_url=upstreams.primary.url,  # the registry wins over it
        spool_dir=directory / "spool",
        TOLLGATE_UPSTREAMS=str(directory / "upstreams.toml"),
        TOLLGATE_PRICES=str(directory / "prices.toml"),
        **KEYS,
        **settings,
    )
    return proxy_server(env=env)


@pytest.fixture(scope="module")
def routing(
    redis_store: RedisServer, upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """Fallback without passive health in the way (an upstream is never taken out)."""
    directory = tmp_path_factory.mktemp("routing")
    with (
        running_proxy(
            redis_store,
            upstreams,
            directory,
            ROUTING,
            TOLLGATE_UPSTREAM_ATTEMPT_TIMEOUT=str(ATTEMPT_TIMEOUT_S),
            TOLLGATE_UPSTREAM_TIMEOUT=str(UPSTREAM_TIMEOUT_S),
            TOLLGATE_UPSTREAM_FAILURE_THRESHOLD="1000000",
            TOLLGATE_PASSTHROUGH_PATHS="/v1/files",
        ) as proxy,
        Admin(proxy.url) as admin,
    ):
        yield Proxy(proxy.url, admin)


@pytest.fixture(scope="module")
def health(
    redis_store: RedisServer, upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("health")
    with (
        running_proxy(
            redis_store,
            upstreams,
            directory,
            HEALTH,
            TOLLGATE_UPSTREAM_FAILURE_THRESHOLD=str(THRESHOLD),
            TOLLGATE_UPSTREAM_COOLDOWN=str(COOLDOWN_S),
            TOLLGATE_UPSTREAM_MAX_ATTEMPTS=str(HEALTH_MAX_ATTEMPTS),
            TOLLGATE_UPSTREAM_ATTEMPT_TIMEOUT="15",
            TOLLGATE_UPSTREAM_TIMEOUT="20",
        ) as proxy,
        Admin(proxy.url) as admin,
    ):
        yield Proxy(proxy.url, admin)


@pytest.fixture
def key(routing: Proxy, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A key without limits or balance (both proxies share the store, so it works on both)."""
    return routing.admin.create_key(name=request.node.name[:200])


@pytest.fixture
def funded(routing: Proxy, request: pytest.FixtureRequest) -> dict[str, Any]:
    return routing.admin.create_key(name=request.node.name[:200], credits=1, rpm=1000)


@pytest.fixture
def sdk(routing: Proxy, key: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=routing.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        yield sdk


# --- helpers -------------------------------------------------------------------------------


def send(
    proxy: Proxy,
    key: dict[str, Any],
    body: dict[str, Any] | bytes,
    *,
    path: str = "/v1/chat/completions",
    request_id: str | None = None,
    timeout_s: float = 20,
) -> httpx.Response:
    """One request with raw httpx, read to its end (a stream too)."""
    headers = {"authorization": f"Bearer {key['key']}", "content-type": "application/json"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with (
        httpx.Client(timeout=timeout_s) as client,
        client.stream("POST", proxy.url + path, content=content, headers=headers) as response,
    ):
        response.read()
    return response


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def arrivals(mock: Mock, request_id: str) -> list[dict[str, Any]]:
    """What this upstream received of the proxied request with this id."""
    return [
        r
        for r in mock.received()
        if request_id in (r["headers"].get("x-request-id"), r["headers"].get("x-client-request-id"))
    ]


def reached(upstreams: Upstreams, request_id: str) -> dict[str, int]:
    """How many requests with this id each mock received."""
    names = ("primary", "backup", "third")
    return {name: len(arrivals(getattr(upstreams, name), request_id)) for name in names}


def records_of(proxy: Proxy, request_id: str, since: float) -> list[dict[str, Any]]:
    return [
        r
        for r in proxy.admin.export(since=since)
        if request_id in (r["request_id"], r.get("client_request_id"))
    ]


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def sse_data(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proxy: Proxy) -> Samples:
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that carry these labels (and maybe others, as `key`)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def attempts_of(samples: Samples, upstream: str, outcome: str) -> float:
    return sample(samples, "tollgate_upstream_requests_total", upstream=upstream, outcome=outcome)


def fallbacks(samples: Samples, source: str, target: str) -> float:
    labels = {"from": source, "to": target}
    return sample(samples, "tollgate_upstream_fallbacks_total", **labels)


def healthy(proxy: Proxy, upstream: str) -> float:
    key = ("tollgate_upstream_healthy", (("upstream", upstream),))
    samples = scrape(proxy)
    assert key in samples, f"no health gauge for {upstream}"
    return samples[key]


# --- routing -------------------------------------------------------------------------------


def test_named_upstream_gets_the_bare_model_and_the_others_nothing(
    routing: Proxy, upstreams: Upstreams, since: float
) -> None:
    # The allowed-model check sees the model as sent upstream, not the `backup/` prefix.
    key = routing.admin.create_key(name="named-upstream", allowed_models=[MODEL])
    request_id = new_request_id()
    with openai.OpenAI(base_url=routing.url + "/v1", api_key=key["key"], max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model=f"backup/{MODEL}",
            messages=MESSAGES,
            temperature=0.5,
            extra_headers={"x-request-id": request_id},
        )
    answer = raw.parse()

    assert answer.choices[0].message.content == REPLY
    assert raw.headers["x-tollgate-upstream"] == "backup"
    assert raw.headers["x-mock-upstream"] == "backup"
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 1, "third": 0}
    (received,) = arrivals(upstreams.backup, request_id)
    assert received["body"] == {"model": MODEL, "messages": MESSAGES, "temperature": 0.5}
    assert received["headers"]["authorization"] == f"Bearer {KEYS['BACKUP_UPSTREAM_KEY']}"
    record = routing.admin.record(request_id, since=since)
    assert (record["model"], record["upstream"], record["attempts"]) == (MODEL, "backup", 1)


def test_slash_model_whose_prefix_is_no_upstream_is_matched_against_patterns(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()
    response = send(routing, key, chat("meta-llama/llama-3"), request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "backup"
    (received,) = arrivals(upstreams.backup, request_id)
    assert received["body"]["model"] == "meta-llama/llama-3"
    assert routing.admin.record(request_id, since=since)["model"] == "meta-llama/llama-3"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # claude_a is an upstream, but of the Anthropic dialect: on chat this is just a model
        # name, and no openai upstream's pattern matches it.
        pytest.param(
            "/v1/chat/completions", chat("claude_a/claude-x"), id="anthropic-name-on-chat"
        ),
        pytest.param(
            "/v1/messages",
            {"model": f"primary/{MODEL}", "max_tokens": 20, "messages": MESSAGES},
            id="openai-name-on-messages",
        ),
        pytest.param("/v1/chat/completions", chat("nobody-serves-this"), id="unknown"),
    ],
)
def test_model_no_upstream_of_the_route_serves_is_404_and_reaches_none(
    routing: Proxy,
    upstreams: Upstreams,
    key: dict[str, Any],
    since: float,
    path: str,
    body: dict[str, Any],
) -> None:
    request_id = new_request_id()
    response = send(routing, key, body, path=path, request_id=request_id)

    assert response.status_code == 404, response.text
    answer = response.json()
    error = answer["error"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    if path == "/v1/chat/completions":
        assert error["code"] == "model_not_found"
    assert body["model"] in error["message"]
    assert "x-tollgate-upstream" not in response.headers
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 0, "third": 0}
    assert records_of(routing, request_id, since) == []


def test_unknown_model_is_refused_before_admission(routing: Proxy) -> None:
    key = routing.admin.create_key(name="unknown-model-rpm", rpm=2)
    for _ in range(3):
        assert send(routing, key, chat("nobody-serves-this")).status_code == 404
    # Had any 404 taken a request from the bucket of 2, one of these would be 429.
    statuses = [send(routing, key, chat(MODEL)).status_code for _ in range(2)]

    assert statuses == [200, 200]


def test_pattern_candidates_are_tried_by_priority(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    assert send(routing, key, chat("shared-x")).headers["x-tollgate-upstream"] == "primary"
    assert send(routing, key, chat("third-x")).headers["x-tollgate-upstream"] == "third"
    upstreams.primary.fault(status=503)
    upstreams.backup.fault(status=503)
    before = scrape(routing)
    request_id = new_request_id()

    response = send(routing, key, chat("shared-x"), request_id=request_id)

    after = scrape(routing)
    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "third"
    assert response.headers["x-mock-upstream"] == "third"
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 1, "third": 1}
    assert fallbacks(after, "primary", "backup") - fallbacks(before, "primary", "backup") == 1
    assert fallbacks(after, "backup", "third") - fallbacks(before, "backup", "third") == 1
    assert fallbacks(after, "primary", "third") == fallbacks(before, "primary", "third")
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (200, "third", 3)


# --- fallback before the first byte --------------------------------------------------------

# trigger: (model, the upstream that fails, its fault, the outcome its attempt is counted as,
# the reason tollgate_upstream_errors_total counts it under)
TRIGGERS: dict[str, tuple[str, str, dict[str, Any] | None, str, str]] = {
    "refused": ("viadead-mini", "dead", None, "connect", "connect"),
    "503": (MODEL, "primary", {"status": 503}, "5xx", "status"),
    "429": (MODEL, "primary", {"status": 429}, "429", "status"),
    "stall": (MODEL, "primary", {"stall": True}, "timeout", "timeout"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_failure_before_the_first_byte_falls_back_to_the_next_upstream(
    routing: Proxy,
    upstreams: Upstreams,
    sdk: openai.OpenAI,
    since: float,
    trigger: str,
    stream: bool,
) -> None:
    model, failing, fault, outcome, reason = TRIGGERS[trigger]
    if fault is not None:
        upstreams.primary.fault(**fault)
    before = scrape(routing)
    request_id = new_request_id()
    started = time.monotonic()

    headers = {"x-request-id": request_id}
    completions = sdk.chat.completions.with_raw_response
    answer_headers: Mapping[str, str]
    if stream:
        raw = completions.create(model=model, messages=MESSAGES, stream=True, extra_headers=headers)
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None
        answer_headers = raw.headers
    else:
        whole = completions.create(model=model, messages=MESSAGES, extra_headers=headers)
        text = whole.parse().choices[0].message.content or ""
        answer_headers = whole.headers

    elapsed = time.monotonic() - started
    after = scrape(routing)
    assert text == REPLY
    assert answer_headers["x-tollgate-upstream"] == "backup"
    assert answer_headers["x-mock-upstream"] == "backup"
    if trigger == "stall":
        assert ATTEMPT_TIMEOUT_S * 0.9 <= elapsed < UPSTREAM_TIMEOUT_S
    (answered,) = arrivals(upstreams.backup, request_id)
    assert answered["headers"]["authorization"] == f"Bearer {KEYS['BACKUP_UPSTREAM_KEY']}"
    if failing == "primary":
        (tried,) = arrivals(upstreams.primary, request_id)
        assert answered["body_sha256"] == tried["body_sha256"]
        assert tried["headers"]["authorization"] == f"Bearer {KEYS['PRIMARY_UPSTREAM_KEY']}"
    else:
        assert arrivals(upstreams.primary, request_id) == []
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (200, "backup", 2)
    assert record["usage_source"] == "upstream"
    assert attempts_of(after, failing, outcome) - attempts_of(before, failing, outcome) == 1
    assert attempts_of(after, "backup", "2xx") - attempts_of(before, "backup", "2xx") == 1
    assert fallbacks(after, failing, "backup") - fallbacks(before, failing, "backup") == 1
    errors = "tollgate_upstream_errors_total"
    assert sample(after, errors, reason=reason) - sample(before, errors, reason=reason) == 1
    seconds = "tollgate_upstream_attempt_seconds_count"
    for name in (failing, "backup"):
        assert sample(after, seconds, upstream=name) - sample(before, seconds, upstream=name) == 1


def test_backup_receives_exactly_the_bytes_the_client_sent(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.primary.fault(status=503)
    raw = (
        b'{ "messages" : [ {"role": "user", "content": "Say h\\u00e9llo"} ],\n'
        b'  "model": "gpt-4o-mini" }'
    )
    request_id = new_request_id()

    response = send(routing, key, raw, request_id=request_id)

    assert response.status_code == 200, response.text
    (tried,) = arrivals(upstreams.primary, request_id)
    (answered,) = arrivals(upstreams.backup, request_id)
    assert tried["body_sha256"] == answered["body_sha256"] == hashlib.sha256(raw).hexdigest()


def test_stream_cut_after_its_first_bytes_is_not_retried(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()

    response = send(routing, key, chat("mock-drop", stream=True), request_id=request_id)

    assert response.status_code == 200
    assert response.headers["x-tollgate-upstream"] == "primary"
    events = sse_data(response)
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert "error" in json.loads(events[-1])
    assert "[DONE]" not in events
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 0, "third": 0}
    record = routing.admin.record(request_id, since=since)
    assert (record["upstream"], record["attempts"]) == ("primary", 1)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_upstream_failing_is_502_naming_each_attempt_and_costs_nothing(
    routing: Proxy, upstreams: Upstreams, funded: dict[str, Any], since: float, stream: bool
) -> None:
    upstreams.primary.fault(status=503)
    upstreams.backup.fault(status=500)
    request_id = new_request_id()

    response = send(routing, funded, chat(MODEL, stream=stream), request_id=request_id)

    assert response.status_code == 502, response.text
    message = error_of(response)["message"]
    assert message == "All 2 upstream attempts failed: primary: status 503; backup: status 500"
    assert "127.0.0.1" not in response.text and "sk-" not in response.text
    assert "x-tollgate-upstream" not in response.headers
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (502, "backup", 2)
    assert record["cost_usd"] == 0
    after = routing.admin.key(funded["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (micros(funded["credits"]), 0)


def test_refused_then_failing_upstream_names_both_attempts(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.backup.fault(status=503)
    request_id = new_request_id()

    response = send(routing, key, chat("viadead-mini"), request_id=request_id)

    assert response.status_code == 502, response.text
    assert error_of(response)["message"] == (
        "All 2 upstream attempts failed: dead: connection failed; backup: status 503"
    )
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (502, "backup", 2)
    assert record["cost_usd"] == 0


def test_no_attempt_reaching_an_upstream_releases_and_records_nothing(
    routing: Proxy, funded: dict[str, Any], since: float
) -> None:
    request_id = new_request_id()

    response = send(routing, funded, chat("dead/viadead-mini"), request_id=request_id)

    assert response.status_code == 502, response.text
    # A single attempt keeps today's message.
    assert error_of(response)["message"].startswith("Upstream connection failed")
    assert records_of(routing, request_id, since) == []
    after = routing.admin.key(funded["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (micros(funded["credits"]), 0)


def test_single_failing_attempt_keeps_the_single_upstream_message(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.backup.fault(status=503)
    request_id = new_request_id()

    response = send(routing, key, chat(f"backup/{MODEL}"), request_id=request_id)

    assert response.status_code == 502, response.text
    assert error_of(response)["message"] == "Upstream answered with status 503"
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 1, "third": 0}
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (502, "backup", 1)


def test_last_attempts_429_is_passed_back_uncharged(
    routing: Proxy, upstreams: Upstreams, funded: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=429)
    upstreams.backup.fault(status=429)
    request_id = new_request_id()

    response = send(routing, funded, chat(MODEL), request_id=request_id)

    assert response.status_code == 429, response.text
    assert response.headers["x-tollgate-upstream"] == "backup"
    assert response.headers["x-mock-upstream"] == "backup"
    assert error_of(response)["message"] == "mock upstream fault: status 429"
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 1, "third": 0}
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (429, "backup", 2)
    assert record["cost_usd"] == 0
    after = routing.admin.key(funded["id"])
    assert (micros(after["credits"]), after["reserved_credits"]) == (micros(funded["credits"]), 0)


def test_last_attempt_runs_to_the_overall_deadline_and_its_timeout_is_504(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=503)
    upstreams.backup.fault(stall=True)
    request_id = new_request_id()
    started = time.monotonic()

    response = send(routing, key, chat(MODEL), request_id=request_id)

    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    # Not cut at the attempt timeout: the last candidate has the request's whole deadline.
    assert UPSTREAM_TIMEOUT_S - 0.5 <= elapsed < UPSTREAM_TIMEOUT_S + 5
    message = error_of(response)["message"]
    prefix = "All 2 upstream attempts failed: primary: status 503; backup: "
    assert message.startswith(prefix), message
    assert "time" in message.removeprefix(prefix)
    record = routing.admin.record(request_id, since=since)
    assert (record["status"], record["upstream"], record["attempts"]) == (504, "backup", 2)
    # As with one upstream: a request that timed out may have been worked on, so it is
    # charged its prompt estimate at the price of the upstream that had it last.
    assert (record["usage_source"], record["completion_tokens"]) == ("estimated", 0)
    assert record["cost_usd"] > 0


def test_anthropic_messages_fall_back_between_anthropic_upstreams(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=529)
    request_id = new_request_id()
    body = {"model": "claude-x", "max_tokens": 50, "messages": MESSAGES}

    response = send(routing, key, body, path="/v1/messages", request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.json()["content"][0]["text"] == REPLY
    assert response.headers["x-tollgate-upstream"] == "claude_b"
    (tried,) = arrivals(upstreams.primary, request_id)
    (answered,) = arrivals(upstreams.backup, request_id)
    assert tried["headers"]["x-api-key"] == KEYS["CLAUDE_A_UPSTREAM_KEY"]
    assert answered["headers"]["x-api-key"] == KEYS["CLAUDE_B_UPSTREAM_KEY"]
    assert answered["body_sha256"] == tried["body_sha256"]
    record = routing.admin.record(request_id, since=since)
    assert (record["upstream"], record["attempts"]) == ("claude_b", 2)


def test_passthrough_goes_to_the_first_openai_upstream_only(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    response = httpx.get(
        routing.url + "/v1/files", headers={"authorization": f"Bearer {key['key']}"}, timeout=20
    )

    # `dead` comes first and refuses; nothing falls back to the live upstreams.
    assert response.status_code == 502, response.text
    for mock in upstreams.mocks:
        assert [r for r in mock.received() if r["path"].endswith("/files")] == []


# --- the `provider` object -----------------------------------------------------------------


def test_provider_order_puts_the_named_first_then_the_rest_by_priority(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    ordered = send(routing, key, chat("shared-x", provider={"order": ["third"]}))
    assert ordered.headers["x-tollgate-upstream"] == "third"
    upstreams.third.fault(status=503)
    upstreams.backup.fault(status=503)
    before = scrape(routing)
    request_id = new_request_id()

    response = send(
        routing,
        key,
        chat("shared-x", provider={"order": ["third", "backup"]}),
        request_id=request_id,
    )

    after = scrape(routing)
    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "primary"
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 1, "third": 1}
    assert fallbacks(after, "third", "backup") - fallbacks(before, "third", "backup") == 1
    assert fallbacks(after, "backup", "primary") - fallbacks(before, "backup", "primary") == 1
    record = routing.admin.record(request_id, since=since)
    assert (record["upstream"], record["attempts"]) == ("primary", 3)


def test_provider_order_never_adds_an_upstream_that_does_not_serve_the_model(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    request_id = new_request_id()

    response = send(routing, key, chat(MODEL, provider={"order": ["third"]}), request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "primary"
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 0, "third": 0}


def test_provider_only_keeps_the_named_upstreams(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.backup.fault(status=503)
    request_id = new_request_id()

    response = send(routing, key, chat(MODEL, provider={"only": ["backup"]}), request_id=request_id)

    assert response.status_code == 502, response.text
    assert error_of(response)["message"] == "Upstream answered with status 503"
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 1, "third": 0}


def test_provider_ignore_drops_the_named_upstreams(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    request_id = new_request_id()

    response = send(
        routing, key, chat(MODEL, provider={"ignore": ["primary"]}), request_id=request_id
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "backup"
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 1, "third": 0}


@pytest.mark.parametrize(
    ("provider", "failing", "tried", "answered_by"),
    [
        # Without `order`: the first candidate only.
        pytest.param({"allow_fallbacks": False}, "primary", ("primary",), None, id="first-only"),
        # With `order`: the ordered ones only, in that order.
        pytest.param(
            {"order": ["backup"], "allow_fallbacks": False},
            "backup",
            ("backup",),
            None,
            id="ordered-one",
        ),
        pytest.param(
            {"order": ["backup", "primary"], "allow_fallbacks": False},
            "backup",
            ("backup", "primary"),
            "primary",
            id="ordered-two",
        ),
    ],
)
def test_provider_allow_fallbacks_false_tries_only_the_allowed_upstreams(
    routing: Proxy,
    upstreams: Upstreams,
    key: dict[str, Any],
    provider: dict[str, Any],
    failing: str,
    tried: tuple[str, ...],
    answered_by: str | None,
) -> None:
    getattr(upstreams, failing).fault(status=503)
    request_id = new_request_id()

    response = send(routing, key, chat(MODEL, provider=provider), request_id=request_id)

    assert response.status_code == (502 if answered_by is None else 200), response.text
    assert response.headers.get("x-tollgate-upstream") == answered_by
    expected = {name: int(name in tried) for name in ("primary", "backup", "third")}
    assert reached(upstreams, request_id) == expected


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        pytest.param("backup", "provider", id="string"),
        pytest.param(["backup"], "provider", id="list"),
        pytest.param({"order": "backup"}, "provider.order", id="order-not-a-list"),
        pytest.param({"only": [1]}, "provider.only", id="only-not-strings"),
        pytest.param({"ignore": ["x" * 65]}, "provider.ignore", id="entry-too-long"),
        pytest.param({"order": [f"u{i}" for i in range(65)]}, "provider.order", id="too-many"),
        pytest.param({"allow_fallbacks": "no"}, "provider.allow_fallbacks", id="not-a-boolean"),
    ],
)
def test_invalid_provider_is_400_naming_the_field(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], provider: Any, param: str
) -> None:
    request_id = new_request_id()

    response = send(routing, key, chat(MODEL, provider=provider), request_id=request_id)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 0, "third": 0}


@pytest.mark.parametrize(
    "provider",
    [None, {"sort": "price", "data_collection": "deny", "allow_fallbacks": True}],
    ids=["null", "openrouter-fields"],
)
def test_null_provider_and_openrouter_fields_are_accepted(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any], provider: Any
) -> None:
    request_id = new_request_id()

    response = send(routing, key, chat(MODEL, provider=provider), request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "primary"
    (received,) = arrivals(upstreams.primary, request_id)
    assert received["body"].get("provider") is None


SURFACE_BODIES = [
    pytest.param("/v1/chat/completions", chat(MODEL, temperature=0), "backup", id="chat"),
    pytest.param("/v1/chat/completions", chat(MODEL, stream=True), "backup", id="chat-stream"),
    pytest.param("/v1/responses", {"model": MODEL, "input": "Say hello"}, "backup", id="responses"),
    pytest.param(
        "/v1/completions", {"model": MODEL, "prompt": "Say hello"}, "backup", id="completions"
    ),
    pytest.param(
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": "Say hello"},
        "backup",
        id="embeddings",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "claude-x", "max_tokens": 20, "messages": MESSAGES},
        "claude_b",
        id="messages",
    ),
]


@pytest.mark.parametrize(("path", "body", "second"), SURFACE_BODIES)
def test_provider_is_obeyed_and_removed_from_the_forwarded_body_on_every_surface(
    routing: Proxy,
    upstreams: Upstreams,
    key: dict[str, Any],
    since: float,
    path: str,
    body: dict[str, Any],
    second: str,
) -> None:
    request_id = new_request_id()
    provider = {"only": [second], "sort": "price"}

    response = send(routing, key, {**body, "provider": provider}, path=path, request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == second
    assert arrivals(upstreams.primary, request_id) == []
    (received,) = arrivals(upstreams.backup, request_id)
    assert "provider" not in received["body"]
    forwarded = {k: v for k, v in received["body"].items() if k != "stream_options"}
    assert forwarded == body
    assert routing.admin.record(request_id, since=since)["upstream"] == second


def test_provider_removed_on_fallback_sends_both_upstreams_the_same_bytes(
    routing: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.primary.fault(status=503)
    request_id = new_request_id()

    response = send(
        routing, key, chat(MODEL, provider={"order": ["primary"]}), request_id=request_id
    )

    assert response.status_code == 200, response.text
    (tried,) = arrivals(upstreams.primary, request_id)
    (answered,) = arrivals(upstreams.backup, request_id)
    assert "provider" not in tried["body"]
    assert tried["body_sha256"] == answered["body_sha256"]


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        pytest.param(MODEL, {"only": ["nobody"]}, id="only-unknown"),
        pytest.param(MODEL, {"ignore": ["primary", "backup"]}, id="ignore-all"),
        pytest.param(MODEL, {"only": ["third"]}, id="only-one-not-serving"),
        pytest.param(f"primary/{MODEL}", {"ignore": ["primary"]}, id="named-then-ignored"),
    ],
)
def test_provider_leaving_no_upstream_is_404(
    routing: Proxy,
    upstreams: Upstreams,
    key: dict[str, Any],
    since: float,
    model: str,
    provider: dict[str, Any],
) -> None:
    request_id = new_request_id()

    response = send(routing, key, chat(model, provider=provider), request_id=request_id)

    assert response.status_code == 404, response.text
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert MODEL in error["message"]
    assert "provider" in error["message"]
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 0, "third": 0}
    assert records_of(routing, request_id, since) == []


# --- accounting ----------------------------------------------------------------------------


def test_fallback_is_admitted_once_and_charged_once_at_the_answering_upstreams_price(
    routing: Proxy, upstreams: Upstreams, funded: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=503, count=1)
    request_id = new_request_id()

    response = send(routing, funded, chat(MODEL), request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "backup"
    assert int(response.headers["x-ratelimit-remaining-requests"]) == 999  # one admission
    usage = response.json()["usage"]
    cost = cost_micros("backup/gpt-4o-mini", usage["prompt_tokens"], usage["completion_tokens"])
    assert cost > cost_micros(MODEL, usage["prompt_tokens"], usage["completion_tokens"])
    record = routing.admin.record(request_id, since=since)
    assert (record["upstream"], record["attempts"]) == ("backup", 2)
    assert micros(record["cost_usd"]) == cost
    after = routing.admin.key(funded["id"])
    assert micros(after["credits"]) == micros(funded["credits"]) - cost
    assert after["reserved_credits"] == 0

    # The same model answered by primary costs primary's (the model's own) price.
    request_id = new_request_id()
    response = send(routing, funded, chat(MODEL), request_id=request_id)

    assert response.headers["x-tollgate-upstream"] == "primary"
    usage = response.json()["usage"]
    own = cost_micros(MODEL, usage["prompt_tokens"], usage["completion_tokens"])
    assert micros(routing.admin.record(request_id, since=since)["cost_usd"]) == own
    assert micros(routing.admin.key(funded["id"])["credits"]) == micros(after["credits"]) - own


def test_admission_reserves_the_worst_case_over_every_candidate(routing: Proxy) -> None:
    # 1000 completion tokens: about 600 µ$ at primary's price, 6000 µ$ at backup's.
    key = routing.admin.create_key(name="worst-case", credits=0.003)
    body = chat(MODEL, max_tokens=1000)

    refused = send(routing, key, body)
    answered = send(routing, key, {**body, "model": f"primary/{MODEL}"})

    assert refused.status_code == 402, refused.text
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-tollgate-upstream"] == "primary"


def test_candidate_without_a_price_leaves_the_request_unpriced(
    routing: Proxy, upstreams: Upstreams, funded: dict[str, Any]
) -> None:
    request_id = new_request_id()
    refused = send(routing, funded, chat("shared-x"), request_id=request_id)
    answered = send(routing, funded, chat("primary/shared-x"))

    assert refused.status_code == 403, refused.text
    assert reached(upstreams, request_id) == {"primary": 0, "backup": 0, "third": 0}
    assert answered.status_code == 200, answered.text


def test_concurrent_requests_through_a_failing_primary_all_fall_back_and_settle(
    routing: Proxy, upstreams: Upstreams, funded: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=503)
    before = scrape(routing)
    request_ids = [new_request_id() for _ in range(20)]

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(lambda rid: send(routing, funded, chat(MODEL), request_id=rid), request_ids)
        )

    after = scrape(routing)
    assert [r.status_code for r in responses] == [200] * 20
    assert {r.headers["x-tollgate-upstream"] for r in responses} == {"backup"}
    records = [routing.admin.record(rid, since=since) for rid in request_ids]
    assert {(r["upstream"], r["attempts"], r["status"]) for r in records} == {("backup", 2, 200)}
    expected = sum(
        cost_micros("backup/gpt-4o-mini", r["prompt_tokens"], r["completion_tokens"])
        for r in records
    )
    assert sum(micros(r["cost_usd"]) for r in records) == expected
    key = routing.admin.key(funded["id"])
    assert micros(key["credits"]) == micros(funded["credits"]) - expected
    assert key["reserved_credits"] == 0
    for rid in request_ids:
        assert (len(arrivals(upstreams.primary, rid)), len(arrivals(upstreams.backup, rid))) == (
            1,
            1,
        )
    assert attempts_of(after, "primary", "5xx") - attempts_of(before, "primary", "5xx") == 20
    assert attempts_of(after, "backup", "2xx") - attempts_of(before, "backup", "2xx") == 20
    assert fallbacks(after, "primary", "backup") - fallbacks(before, "primary", "backup") == 20


def test_metrics_label_the_model_as_sent_upstream(routing: Proxy, key: dict[str, Any]) -> None:
    labels = {"route": "chat_completions", "model": MODEL, "status": "200"}
    before = sample(scrape(routing), "tollgate_requests_total", **labels)

    assert send(routing, key, chat(f"backup/{MODEL}")).status_code == 200

    after = scrape(routing)
    assert sample(after, "tollgate_requests_total", **labels) - before == 1
    assert not [k for k in after if ("model", f"backup/{MODEL}") in k[1]]


# --- passive health ------------------------------------------------------------------------


def test_failing_upstream_is_skipped_after_the_threshold_then_one_probe_closes_it(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    assert healthy(health, "flaky_a") == 1
    upstreams.primary.fault(status=503)
    for _ in range(THRESHOLD):
        request_id = new_request_id()
        response = send(health, key, chat("ha-x"), request_id=request_id)
        assert response.headers["x-tollgate-upstream"] == "steady_a", response.text
        assert len(arrivals(upstreams.primary, request_id)) == 1
    opened = time.monotonic()
    assert healthy(health, "flaky_a") == 0

    request_id = new_request_id()
    skipped = send(health, key, chat("ha-x"), request_id=request_id)

    assert time.monotonic() - opened < COOLDOWN_S  # still inside the cool-down
    assert skipped.status_code == 200, skipped.text
    assert skipped.headers["x-tollgate-upstream"] == "steady_a"
    assert arrivals(upstreams.primary, request_id) == []
    assert health.admin.record(request_id, since=since)["attempts"] == 1

    upstreams.primary.clear_fault()
    time.sleep(max(0.0, opened + COOLDOWN_S + 0.3 - time.monotonic()))
    request_id = new_request_id()
    probe = send(health, key, chat("ha-x"), request_id=request_id)

    assert probe.status_code == 200, probe.text
    assert probe.headers["x-tollgate-upstream"] == "flaky_a"
    assert len(arrivals(upstreams.primary, request_id)) == 1
    assert healthy(health, "flaky_a") == 1
    assert healthy(health, "steady_a") == 1


def test_failed_probe_opens_the_upstream_for_another_cooldown(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=503)
    for _ in range(THRESHOLD):
        assert send(health, key, chat("hb-x")).headers["x-tollgate-upstream"] == "steady_b"
    opened = time.monotonic()
    time.sleep(max(0.0, opened + COOLDOWN_S + 0.3 - time.monotonic()))

    probe_id = new_request_id()
    probe = send(health, key, chat("hb-x"), request_id=probe_id)
    reopened = time.monotonic()
    after_id = new_request_id()
    after = send(health, key, chat("hb-x"), request_id=after_id)

    assert time.monotonic() - reopened < COOLDOWN_S
    assert probe.headers["x-tollgate-upstream"] == "steady_b", probe.text
    assert len(arrivals(upstreams.primary, probe_id)) == 1
    assert health.admin.record(probe_id, since=since)["attempts"] == 2
    assert after.headers["x-tollgate-upstream"] == "steady_b", after.text
    assert arrivals(upstreams.primary, after_id) == []
    assert healthy(health, "flaky_b") == 0


def test_after_the_cooldown_only_one_request_probes_while_the_others_skip_it(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any], since: float
) -> None:
    upstreams.primary.fault(status=503)
    for _ in range(THRESHOLD):
        assert send(health, key, chat("hp-x")).headers["x-tollgate-upstream"] == "steady_p"
    opened = time.monotonic()
    upstreams.primary.fault(stall=True, count=1)  # the probe hangs for flaky_p's 1 s
    time.sleep(max(0.0, opened + COOLDOWN_S + 0.3 - time.monotonic()))
    probe_id, other_id = new_request_id(), new_request_id()

    with ThreadPoolExecutor(max_workers=1) as pool:
        probing = pool.submit(send, health, key, chat("hp-x"), request_id=probe_id)
        wait_for(lambda: arrivals(upstreams.primary, probe_id), what="the probe upstream")
        other = send(health, key, chat("hp-x"), request_id=other_id)
        probe = probing.result()

    assert other.headers["x-tollgate-upstream"] == "steady_p", other.text
    assert arrivals(upstreams.primary, other_id) == []
    assert probe.headers["x-tollgate-upstream"] == "steady_p", probe.text
    assert health.admin.record(probe_id, since=since)["attempts"] == 2


def test_open_upstream_that_is_the_only_candidate_is_still_tried(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.primary.fault(status=503)
    for _ in range(THRESHOLD):
        assert send(health, key, chat("hc-x")).status_code == 502
    assert healthy(health, "lonely") == 0
    request_id = new_request_id()

    response = send(health, key, chat("hc-x"), request_id=request_id)

    assert response.status_code == 502, response.text
    assert error_of(response)["message"] == "Upstream answered with status 503"
    assert len(arrivals(upstreams.primary, request_id)) == 1


def test_a_success_resets_the_failure_count(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    served_by = []
    for _ in range(2):  # fail, succeed, fail: never two failures in a row
        upstreams.primary.fault(status=503, count=1)
        served_by.append(send(health, key, chat("hd-x")).headers["x-tollgate-upstream"])
        served_by.append(send(health, key, chat("hd-x")).headers["x-tollgate-upstream"])

    assert served_by == ["steady_d", "flaky_d", "steady_d", "flaky_d"]
    assert healthy(health, "flaky_d") == 1


def test_max_attempts_bounds_the_candidates_tried(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.primary.fault(status=503)  # m1 and m2; m3 (backup) would answer
    request_id = new_request_id()

    response = send(health, key, chat("hm-x"), request_id=request_id)

    assert response.status_code == 502, response.text
    assert error_of(response)["message"] == (
        "All 2 upstream attempts failed: m1: status 503; m2: status 503"
    )
    assert reached(upstreams, request_id) == {"primary": 2, "backup": 0, "third": 0}


def test_attempt_timeout_of_an_upstream_overrides_the_setting(
    health: Proxy, upstreams: Upstreams, key: dict[str, Any]
) -> None:
    upstreams.primary.fault(stall=True)
    request_id = new_request_id()
    started = time.monotonic()

    # The setting gives an attempt 15 s; `quick` has 0.5 s of its own.
    response = send(health, key, chat("hq-x"), request_id=request_id, timeout_s=15)

    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.headers["x-tollgate-upstream"] == "steady_q"
    assert 0.4 <= elapsed < 5
    assert reached(upstreams, request_id) == {"primary": 1, "backup": 1, "third": 0}
