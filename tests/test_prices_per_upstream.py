"""Prices per upstream: `[models."<upstream>/<model>"]` wins over `[models."<model>"]` for the
requests that upstream answers, and admission reserves the worst case over every candidate."""

from __future__ import annotations

from proxy.credits import Price, load_prices
from proxy.metering import Usage

PRICES = load_prices(
    """
    [default]
    input = 1
    output = 1

    [models."gpt-4o"]
    input = 2.50
    output = 10

    [models."openai/gpt-4o"]
    input = 5
    output = 15
    cached_input = 2.50

    [models."cheap/gpt-4o"]
    input = 0.50
    output = 1
    """
)
# No default: a model without a price of its own is unpriced.
BACKUP_ONLY = load_prices(
    """
    [models."backup/gpt-4o"]
    input = 3
    output = 12

    [models."o3"]
    input = 2
    output = 8
    """
)


def test_an_upstreams_own_price_wins_over_the_models() -> None:
    assert PRICES.price("gpt-4o", upstream="openai") == Price(
        5_000_000, 15_000_000, cached_input_micros_per_m=2_500_000
    )
    assert PRICES.cost_micros("gpt-4o", 1_000_000, 1_000_000, upstream="openai") == 20_000_000


def test_an_upstream_without_its_own_price_takes_the_models_price() -> None:
    assert PRICES.price("gpt-4o", upstream="backup") == Price(2_500_000, 10_000_000)
    assert PRICES.cost_micros("gpt-4o", 1_000_000, 1_000_000, upstream="backup") == 12_500_000


def test_a_model_without_any_price_at_that_upstream_takes_the_default() -> None:
    assert PRICES.price("o3", upstream="openai") == Price(1_000_000, 1_000_000)
    assert PRICES.cost_micros("o3", 1_000_000, 1_000_000, upstream="openai") == 2_000_000


def test_without_an_upstream_the_models_own_price_applies_as_before() -> None:
    assert PRICES.price("gpt-4o") == Price(2_500_000, 10_000_000)
    assert PRICES.cost_micros("gpt-4o", 1_000_000, 0) == 2_500_000
    assert PRICES.usage_cost_micros("gpt-4o", Usage(1_000_000, 0, "upstream")) == 2_500_000


def test_a_price_only_for_one_upstream_prices_that_upstream_alone() -> None:
    assert BACKUP_ONLY.price("gpt-4o", upstream="backup") == Price(3_000_000, 12_000_000)
    assert BACKUP_ONLY.cost_micros("gpt-4o", 1_000_000, 1_000_000, upstream="backup") == (
        15_000_000
    )
    assert BACKUP_ONLY.price("gpt-4o", upstream="openai") is None
    assert BACKUP_ONLY.price("gpt-4o") is None
    assert BACKUP_ONLY.cost_micros("gpt-4o", 1_000_000, 1_000_000, upstream="openai") == 0


def test_the_real_cost_is_at_the_answering_upstreams_price_with_its_cache_prices() -> None:
    details = {"prompt_tokens_details": {"cached_tokens": 400_000}}
    usage = Usage(1_000_000, 100_000, "upstream", details)
    # 600k uncached at $5, 400k cached at $2.50, 100k completion at $15.
    assert PRICES.usage_cost_micros("gpt-4o", usage, upstream="openai") == 5_500_000
    # The model's own price has no cached_input: every prompt token at $2.50.
    assert PRICES.usage_cost_micros("gpt-4o", usage, upstream="backup") == 3_500_000


def test_the_worst_cost_is_the_largest_over_the_candidates() -> None:
    worst = PRICES.worst_cost_micros("gpt-4o", ["cheap", "openai", "backup"], 1_000_000, 100_000)
    assert worst == 6_500_000  # openai: $5 + 0.1 x $15
    assert PRICES.worst_cost_micros("gpt-4o", ["cheap"], 1_000_000, 100_000) == 600_000
    assert PRICES.worst_cost_micros("gpt-4o", ["cheap", "backup"], 1_000_000, 100_000) == (
        3_500_000
    )


def test_the_worst_cost_is_rounded_up_like_each_cost() -> None:
    assert PRICES.worst_cost_micros("gpt-4o", ["cheap"], 1, 0) == 1


def test_the_worst_cost_is_unpriced_when_any_candidate_has_no_price() -> None:
    assert BACKUP_ONLY.worst_cost_micros("gpt-4o", ["backup"], 1_000_000, 0) == 3_000_000
    assert BACKUP_ONLY.worst_cost_micros("gpt-4o", ["backup", "openai"], 1_000_000, 0) is None
    assert BACKUP_ONLY.worst_cost_micros("gpt-4o", ["openai", "backup"], 1_000_000, 0) is None
    assert BACKUP_ONLY.worst_cost_micros("mystery", ["backup"], 1_000_000, 0) is None


def test_the_worst_cost_of_a_model_priced_for_every_upstream_by_its_own_name() -> None:
    assert BACKUP_ONLY.worst_cost_micros("o3", ["backup", "openai"], 1_000_000, 0) == 2_000_000


def test_the_worst_cost_without_candidates_is_the_models_own_cost() -> None:
    assert PRICES.worst_cost_micros("gpt-4o", [], 1_000_000, 0) == 2_500_000
    assert BACKUP_ONLY.worst_cost_micros("gpt-4o", [], 1_000_000, 0) is None


def test_a_model_whose_name_has_a_slash_is_looked_up_under_the_upstreams_prefix() -> None:
    table = load_prices(
        """
        [models."meta-llama/llama-3"]
        input = 1
        output = 1

        [models."backup/meta-llama/llama-3"]
        input = 2
        output = 2
        """
    )
    assert table.price("meta-llama/llama-3", upstream="backup") == Price(2_000_000, 2_000_000)
    assert table.price("meta-llama/llama-3", upstream="openai") == Price(1_000_000, 1_000_000)
