"""Prices and costs: the price table, worst cases and real costs in micro-dollars, cached and
cache-written prompt tokens at their own prices, and what a key is charged for them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from proxy.config import Settings
from proxy.credits import (
    Price,
    PriceTable,
    cache_tokens,
    load_prices,
    micros_to_usd,
    usd_to_micros,
)
from proxy.metering import Usage
from tests.conftest import HarnessFactory, bearer

# $ per million: input 2.50, cached input 1.25, output 10 (gpt-4o); input 3, cache write 3.75,
# cache read 0.30, output 15 (Claude Sonnet).
CACHED = PriceTable(
    models={
        "gpt-4o": Price(2_500_000, 10_000_000, cached_input_micros_per_m=1_250_000),
        "sonnet": Price(
            3_000_000,
            15_000_000,
            cached_input_micros_per_m=300_000,
            cache_write_micros_per_m=3_750_000,
        ),
        "plain": Price(1_000_000, 2_000_000),
    }
)


def anthropic_usage(uncached: int, written: int, read: int, completion: int) -> Usage:
    """Usage as the Anthropic surface reports it: the prompt counts every part."""
    details = {"cache_creation_input_tokens": written, "cache_read_input_tokens": read}
    return Usage(uncached + written + read, completion, "upstream", details)


def test_cost_is_rounded_up_to_the_micro_dollar() -> None:
    table = PriceTable(models={"cheap": Price(150_000, 600_000)})  # $0.15 / $0.60 per M
    assert table.cost_micros("cheap", 1, 0) == 1  # 0.15 micros
    assert table.cost_micros("cheap", 0, 1) == 1  # 0.6 micros
    assert table.cost_micros("cheap", 10, 0) == 2  # 1.5 micros
    assert table.cost_micros("cheap", 20, 0) == 3  # exactly 3 micros
    assert table.cost_micros("cheap", 1_000_000, 1_000_000) == 750_000
    assert table.cost_micros("cheap", 0, 0) == 0


def test_cost_of_a_million_tokens_is_the_listed_price() -> None:
    table = load_prices('[models."gpt-4o"]\ninput = 2.50\noutput = 10.00\n')
    assert table.cost_micros("gpt-4o", 1_000_000, 0) == 2_500_000
    assert table.cost_micros("gpt-4o", 0, 1_000_000) == 10_000_000
    assert table.cost_micros("gpt-4o", 123, 456) == -(
        -(123 * 2_500_000 + 456 * 10_000_000) // 10**6
    )


def test_load_prices_reads_a_custom_table() -> None:
    table = load_prices(
        """
        [default]
        input = 1
        output = 2.5

        [models."acme-large"]
        input = 0.000001
        output = 30

        [models."free"]
        input = 0
        output = 0
        """
    )
    assert table.default == Price(1_000_000, 2_500_000)
    assert table.price("acme-large") == Price(1, 30_000_000)
    assert table.price("free") == Price(0, 0)
    assert table.cost_micros("free", 10**6, 10**6) == 0
    assert table.cost_micros("acme-large", 1_000_000, 0) == 1


def test_unlisted_model_uses_the_default_price() -> None:
    table = load_prices("[default]\ninput = 1\noutput = 2\n")
    assert table.price("anything") == Price(1_000_000, 2_000_000)
    assert table.cost_micros("anything", 1000, 500) == 2000


def test_unlisted_model_without_default_is_unpriced() -> None:
    table = load_prices('[models."known"]\ninput = 1\noutput = 2\n')
    assert table.price("anything") is None
    assert table.cost_micros("anything", 1000, 500) == 0
    assert table.price("known") == Price(1_000_000, 2_000_000)


def test_builtin_price_table_loads() -> None:
    table = load_prices(None)
    assert table.price("gpt-4o-mini") == Price(150_000, 600_000, cached_input_micros_per_m=75_000)
    assert table.price("gpt-4o") == Price(
        2_500_000, 10_000_000, cached_input_micros_per_m=1_250_000
    )
    assert table.price("claude-sonnet-4-20250514") == Price(
        3_000_000,
        15_000_000,
        cached_input_micros_per_m=300_000,
        cache_write_micros_per_m=3_750_000,
    )
    assert table.default == Price(1_000_000, 2_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "[default]\ninput = 1\n",
        "[default]\ninput = -1\noutput = 1\n",
        "[default]\ninput = '1'\noutput = 1\n",
        "default = 1\n",
        "models = []\n",
        '[models."x"]\ninput = true\noutput = 1\n',
        '[models."x"]\ninput = 1\noutput = 1\ncached_input = -0.5\n',
        '[models."x"]\ninput = 1\noutput = 1\ncache_write = "3.75"\n',
    ],
)
def test_load_prices_rejects_bad_tables(text: str) -> None:
    with pytest.raises(ValueError):
        load_prices(text)


def test_usd_and_micros_convert_with_six_decimals() -> None:
    assert usd_to_micros(5) == 5_000_000
    assert usd_to_micros(0.1234567) == 123_457
    assert usd_to_micros(-0.75) == -750_000
    assert micros_to_usd(123_457) == 0.123457
    assert micros_to_usd(1) == 0.000001
    assert micros_to_usd(-500_000) == -0.5
    assert micros_to_usd(usd_to_micros(0.1) + usd_to_micros(0.2)) == 0.3


# --- cached and cache-written prompt tokens ----------------------------------------------------


def test_load_prices_reads_cache_prices_and_leaves_absent_ones_unset() -> None:
    table = load_prices(
        '[models."m"]\ninput = 3\noutput = 15\ncached_input = 0.3\ncache_write = 3.75\n'
        '[models."n"]\ninput = 1\noutput = 2\n'
    )
    assert table.price("m") == Price(
        3_000_000, 15_000_000, cached_input_micros_per_m=300_000, cache_write_micros_per_m=3_750_000
    )
    assert table.price("n") == Price(1_000_000, 2_000_000)


def test_usage_without_cache_details_costs_what_cost_micros_says() -> None:
    usage = Usage(1234, 567, "upstream", {"completion_tokens_details": {"reasoning_tokens": 9}})
    assert CACHED.usage_cost_micros("gpt-4o", usage) == CACHED.cost_micros("gpt-4o", 1234, 567)
    assert CACHED.usage_cost_micros("unpriced", usage) == 0


@pytest.mark.parametrize("details_name", ["prompt_tokens_details", "input_tokens_details"])
def test_openai_cached_tokens_are_part_of_the_prompt_at_the_cached_price(details_name: str) -> None:
    usage = Usage(1000, 100, "upstream", {details_name: {"cached_tokens": 800}})
    # 200 * $2.50 + 800 * $1.25 + 100 * $10 per million
    assert CACHED.usage_cost_micros("gpt-4o", usage) == 500 + 1000 + 1000
    assert cache_tokens(usage) == (800, 0)


def test_anthropic_cache_reads_and_writes_are_charged_at_their_own_prices() -> None:
    usage = anthropic_usage(uncached=100, written=1000, read=2000, completion=50)
    # 100 * $3 + 1000 * $3.75 + 2000 * $0.30 + 50 * $15 per million
    assert CACHED.usage_cost_micros("sonnet", usage) == 300 + 3750 + 600 + 750
    assert cache_tokens(usage) == (2000, 1000)


def test_absent_cache_prices_charge_those_tokens_at_the_input_price() -> None:
    anthropic = anthropic_usage(uncached=100, written=1000, read=2000, completion=50)
    assert CACHED.usage_cost_micros("plain", anthropic) == CACHED.cost_micros("plain", 3100, 50)
    # gpt-4o has a cached price but no write price: writes cost its input price.
    assert CACHED.usage_cost_micros("gpt-4o", anthropic) == 250 + 2500 + 2500 + 500


def test_cache_costs_round_up_once_to_the_micro_dollar() -> None:
    usage = Usage(3, 0, "upstream", {"prompt_tokens_details": {"cached_tokens": 1}})
    # 2 * 2.5 + 1 * 1.25 = 6.25 micros → 7
    assert CACHED.usage_cost_micros("gpt-4o", usage) == 7


@pytest.mark.parametrize(
    ("details", "parts"),
    [
        ({"prompt_tokens_details": {"cached_tokens": 5000}}, (100, 0)),  # capped at the prompt
        ({"prompt_tokens_details": {"cached_tokens": -3}}, (0, 0)),
        ({"prompt_tokens_details": {"cached_tokens": True}}, (0, 0)),
        ({"prompt_tokens_details": {"cached_tokens": "40"}}, (0, 0)),
        ({"prompt_tokens_details": None}, (0, 0)),
        ({"cache_read_input_tokens": 60, "cache_creation_input_tokens": 70}, (60, 40)),
        ({"cache_read_input_tokens": None, "cache_creation_input_tokens": 2.5}, (0, 0)),
    ],
)
def test_malformed_or_oversized_cache_counts_never_exceed_the_prompt(
    details: dict[str, Any], parts: tuple[int, int]
) -> None:
    usage = Usage(100, 0, "upstream", details)
    assert cache_tokens(usage) == parts
    assert CACHED.usage_cost_micros("sonnet", usage) >= 0


def test_a_cache_write_above_input_is_the_only_excess_over_an_exact_estimate() -> None:
    """Admission reserves every prompt token at the input price; Anthropic's cache writes cost
    1.25 * input, so a written prompt may cost more than its reservation, by at most the written
    tokens * (cache_write - input): SPEC §5's allowed excess. Reads cost less."""
    reserved = CACHED.cost_micros("sonnet", 10_000, 100)
    written = anthropic_usage(uncached=0, written=10_000, read=0, completion=100)
    excess = CACHED.usage_cost_micros("sonnet", written) - reserved
    assert excess == 10_000 * (3_750_000 - 3_000_000) // 1_000_000
    read = anthropic_usage(uncached=0, written=0, read=10_000, completion=100)
    assert CACHED.usage_cost_micros("sonnet", read) < reserved
    openai = Usage(10_000, 100, "upstream", {"prompt_tokens_details": {"cached_tokens": 10_000}})
    assert CACHED.usage_cost_micros("gpt-4o", openai) < CACHED.cost_micros("gpt-4o", 10_000, 100)


# --- through the proxy -------------------------------------------------------------------------

CHAT_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 100,
    "total_tokens": 1100,
    "prompt_tokens_details": {"cached_tokens": 800},
}
RESPONSES_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 800},
    "output_tokens": 100,
    "total_tokens": 1100,
}


def _cached_upstream(request: httpx.Request) -> httpx.Response:
    """An upstream that reports 800 of 1,000 prompt tokens as cached, JSON or streamed."""
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"object": "list", "data": []})
    body = json.loads(request.content)
    sse = {"content-type": "text/event-stream"}
    if request.url.path.endswith("/responses"):
        final = {"id": "resp_1", "object": "response", "status": "completed"}
        final["usage"] = RESPONSES_USAGE
        if not body.get("stream"):
            return httpx.Response(200, json=final)
        event = {"type": "response.completed", "response": final}
        stream = f"event: response.completed\ndata: {json.dumps(event)}\n\n"
        return httpx.Response(200, stream=httpx.ByteStream(stream.encode()), headers=sse)
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": CHAT_USAGE}
    if not body.get("stream"):
        return httpx.Response(200, json=answer)
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": []}
    stream = f"data: {json.dumps({**chunk, 'usage': CHAT_USAGE})}\n\ndata: [DONE]\n\n"
    return httpx.Response(200, stream=httpx.ByteStream(stream.encode()), headers=sse)


def test_cached_prompt_tokens_are_charged_at_the_cached_price_on_every_openai_surface(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, upstream=httpx.MockTransport(_cached_upstream)) as harness:
        record = harness.create_key(credits=1)
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
        responses = {"model": "gpt-4o", "input": "Hi"}
        for path, body in [("/v1/chat/completions", chat), ("/v1/responses", responses)]:
            for stream in (False, True):
                answer = harness.client.post(
                    path, json={**body, "stream": stream}, headers=bearer(record["key"])
                )
                assert answer.status_code == 200, answer.text
        records = harness.export()
        # 200 * $2.50 + 800 * $1.25 + 100 * $10 per million = $0.0025, not $0.0035 uncached
        assert [r["cost_usd"] for r in records] == [0.0025] * 4
        assert {r["prompt_tokens"] for r in records} == {1000}
        key = harness.admin("GET", f"/admin/keys/{record['id']}").json()
        assert (key["credits"], key["reserved_credits"]) == (1 - 4 * 0.0025, 0)


def test_anthropic_cache_writes_then_reads_are_charged_at_their_prices(harness: Any) -> None:
    """The mock upstream writes a `cache_control` system prefix to its cache the first time and
    reads it after: the same request costs more once, then less."""
    record = harness.create_key(credits=1)
    system = [{"type": "text", "text": "x" * 4000, "cache_control": {"type": "ephemeral"}}]
    body = {"model": "claude-sonnet-4-20250514", "max_tokens": 64, "system": system,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    for _ in range(2):
        answer = harness.client.post("/v1/messages", json=body, headers=bearer(record["key"]))
        assert answer.status_code == 200, answer.text
    written, read = harness.export()
    for usage_record in (written, read):
        details = usage_record["usage_details"]
        cache_write, cache_read = (
            details["cache_creation_input_tokens"], details["cache_read_input_tokens"]
        )  # fmt: skip
        uncached = usage_record["prompt_tokens"] - cache_write - cache_read
        # $3 input, $3.75 cache write, $0.30 cache read, $15 output per million
        scaled = uncached * 3_000_000 + cache_write * 3_750_000 + cache_read * 300_000
        scaled += usage_record["completion_tokens"] * 15_000_000
        assert usage_record["cost_usd"] == micros_to_usd(-(-scaled // 10**6))
    assert written["usage_details"]["cache_creation_input_tokens"] > 0
    assert read["usage_details"]["cache_read_input_tokens"] > 0
    assert written["cost_usd"] > read["cost_usd"]
