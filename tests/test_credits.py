"""Prices and costs: the price table, worst cases and real costs in micro-dollars."""

from __future__ import annotations

import pytest

from proxy.credits import (
    Price,
    PriceTable,
    load_prices,
    micros_to_usd,
    usd_to_micros,
)


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
    assert table.price("gpt-4o-mini") == Price(150_000, 600_000)
    assert table.price("gpt-4o") == Price(2_500_000, 10_000_000)
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
