"""Prices and costs: what a request may cost (its reservation) and what it did cost.

Money is integer micro-dollars everywhere; USD numbers appear only at the API edge.
"""

from __future__ import annotations

import tomllib
from dataclasses import KW_ONLY, dataclass, field
from importlib import resources
from typing import Any

from proxy.metering import Usage

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE = 1_000_000  # prices are per million tokens
# Optional prices of a model's table; absent, those tokens cost the input price.
_CACHE_PARTS = ("cached_input", "cache_write")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, kept as micro-dollars per million tokens (exact integers).

    `cached_input` prices prompt tokens read from the upstream's prompt cache (OpenAI's
    `cached_tokens`, Anthropic's cache reads), `cache_write` those written to it (Anthropic's
    cache creation); None means the input price."""

    input_micros_per_m: int
    output_micros_per_m: int
    _: KW_ONLY
    cached_input_micros_per_m: int | None = None
    cache_write_micros_per_m: int | None = None


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by model name, or by `<upstream>/<model>` for one upstream's own price."""

    models: dict[str, Price] = field(default_factory=dict)
    default: Price | None = None
    # Whether any price names an upstream: without one, every upstream's price is the model's.
    by_upstream: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_upstream", any("/" in name for name in self.models))

    def price(self, model: str, *, upstream: str | None = None) -> Price | None:
        """The model's price at that upstream (`[models."<upstream>/<model>"]`), else the
        model's own, else the default, else None (unpriced)."""
        if upstream is not None and self.by_upstream:
            price = self.models.get(f"{upstream}/{model}")
            if price is not None:
                return price
        return self.models.get(model, self.default)

    def cost_micros(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        upstream: str | None = None,
    ) -> int:
        """Every prompt token at the input price: the worst case admission reserves.

        Rounded up to the micro-dollar, so many small requests never cost nothing."""
        price = self.price(model, upstream=upstream)
        if price is None:
            return 0
        return _worst_case(price, prompt_tokens, completion_tokens)

    def worst_cost_micros(
        self, model: str, upstreams: list[str], prompt_tokens: int, completion_tokens: int
    ) -> int | None:
        """The largest `cost_micros` over the upstreams that may answer (a request's fallback
        candidates): what admission reserves, since any of them may be the one that is charged.

        None when any of them has no price, so the request is unpriced; with no upstreams
        named, the model's own price decides."""
        worst = 0
        for upstream in (upstreams if self.by_upstream else None) or (None,):
            price = self.price(model, upstream=upstream)
            if price is None:
                return None
            worst = max(worst, _worst_case(price, prompt_tokens, completion_tokens))
        return worst

    def usage_cost_micros(self, model: str, usage: Usage, *, upstream: str | None = None) -> int:
        """What a request did cost: its prompt's cache reads at `cached_input`, its cache writes
        at `cache_write`, the rest of the prompt at `input`, its completion at `output`.

        Never more than `cost_micros` of the same tokens unless `cache_write` (or
        `cached_input`) is above `input`: Anthropic's cache writes cost 1.25 times its input,
        so a prompt written to the cache may exceed its reservation by at most the written
        tokens * (cache_write - input), charged as SPEC §5's allowed excess."""
        price = self.price(model, upstream=upstream)
        if price is None:
            return 0
        read, written = cache_tokens(usage)
        cached_price = price.cached_input_micros_per_m
        write_price = price.cache_write_micros_per_m
        scaled = (usage.prompt_tokens - read - written) * price.input_micros_per_m
        scaled += read * (price.input_micros_per_m if cached_price is None else cached_price)
        scaled += written * (price.input_micros_per_m if write_price is None else write_price)
        scaled += usage.completion_tokens * price.output_micros_per_m
        return -(-scaled // TOKENS_PER_PRICE)


def _worst_case(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    scaled = prompt_tokens * price.input_micros_per_m
    scaled += completion_tokens * price.output_micros_per_m
    return -(-scaled // TOKENS_PER_PRICE)


def cache_tokens(usage: Usage) -> tuple[int, int]:
    """The prompt tokens a usage reports as read from and written to the prompt cache.

    Both are parts of `prompt_tokens`: OpenAI's `prompt_tokens_details.cached_tokens` (chat,
    completions) or `input_tokens_details.cached_tokens` (Responses); Anthropic's
    `cache_read_input_tokens` and `cache_creation_input_tokens`, which its surface adds into
    `prompt_tokens`. Malformed counts are 0; the parts never exceed the prompt."""
    details = usage.details
    if not details:
        return 0, 0
    read = _count(details.get("cache_read_input_tokens"))
    for name in ("prompt_tokens_details", "input_tokens_details"):
        part = details.get(name)
        if isinstance(part, dict):
            read = max(read, _count(part.get("cached_tokens")))
    read = min(read, usage.prompt_tokens)
    written = min(_count(details.get("cache_creation_input_tokens")), usage.prompt_tokens - read)
    return read, written


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usd_to_micros(amount: float | int) -> int:
    return round(amount * MICROS_PER_USD)


def micros_to_usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


def _usd_per_m(name: str, part: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"[{name}].{part} must be a non-negative number")
    return usd_to_micros(value)


def _price(name: str, raw: Any) -> Price:
    if not isinstance(raw, dict):
        raise ValueError(f"[{name}] must be a table with input and output")
    cache = {
        part: _usd_per_m(name, part, raw[part]) if part in raw else None for part in _CACHE_PARTS
    }
    return Price(
        _usd_per_m(name, "input", raw.get("input")),
        _usd_per_m(name, "output", raw.get("output")),
        cached_input_micros_per_m=cache["cached_input"],
        cache_write_micros_per_m=cache["cache_write"],
    )


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
