"""Prices and costs: what a request may cost (its reservation) and what it did cost.

Money is integer micro-dollars everywhere; USD numbers appear only at the API edge.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE = 1_000_000  # prices are per million tokens


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, kept as micro-dollars per million tokens (exact integers)."""

    input_micros_per_m: int
    output_micros_per_m: int


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: dict[str, Price] = field(default_factory=dict)
    default: Price | None = None

    def price(self, model: str) -> Price | None:
        """The model's price, else the default, else None (unpriced)."""
        return self.models.get(model, self.default)

    def cost_micros(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost rounded up to the micro-dollar, so many small requests never cost nothing."""
        price = self.price(model)
        if price is None:
            return 0
        scaled = prompt_tokens * price.input_micros_per_m
        scaled += completion_tokens * price.output_micros_per_m
        return -(-scaled // TOKENS_PER_PRICE)


def usd_to_micros(amount: float | int) -> int:
    return round(amount * MICROS_PER_USD)


def micros_to_usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


def _price(name: str, raw: Any) -> Price:
    if not isinstance(raw, dict):
        raise ValueError(f"[{name}] must be a table with input and output")
    values = []
    for part in ("input", "output"):
        value = raw.get(part)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"[{name}].{part} must be a non-negative number")
        values.append(usd_to_micros(value))
    return Price(values[0], values[1])


def load_prices(text: str | None) -> PriceTable:
    """Parse a TOML price table; None loads the built-in one."""
    if text is None:
        text = resources.files("proxy").joinpath("prices.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError("[models] must be a table")
    default = _price("default", data["default"]) if "default" in data else None
    return PriceTable(
        models={name: _price(f'models."{name}"', raw) for name, raw in models.items()},
        default=default,
    )
