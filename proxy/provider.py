"""The `provider` object of a request body: the client's say in which upstreams serve it.

OfoxAI's extension, in OpenRouter's shape: `order`, `only`, `ignore`, `allow_fallbacks` narrow
and reorder the candidates the operator configured and never add one. Other fields of that shape
(`sort`, `data_collection`, ...) are accepted and ignored. Tollgate removes the object before
forwarding: upstreams never see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidRequest

MAX_NAMES = 64
MAX_NAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class Preferences:
    order: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    allow_fallbacks: bool = True

    def apply(self, names: list[str]) -> list[str]:
        """Narrow and reorder candidate upstream names (given by priority)."""
        kept = [n for n in names if (self.only is None or n in self.only) and n not in self.ignore]
        if not self.order:
            return kept if self.allow_fallbacks else kept[:1]
        rank = {name: i for i, name in reversed(list(enumerate(self.order)))}
        ordered = sorted((n for n in kept if n in rank), key=rank.__getitem__)
        if not self.allow_fallbacks:
            return ordered
        return ordered + [n for n in kept if n not in rank]


def _names(value: Any, param: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_NAMES
        or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in value)
    ):
        raise InvalidRequest(
            f"{param} must be a list of at most {MAX_NAMES} upstream names "
            f"(each 1-{MAX_NAME_CHARS} characters)",
            param=param,
        )
    return tuple(value)


def preferences(body: dict[str, Any]) -> Preferences | None:
    """The body's `provider` object, validated (400 naming the field); None when absent."""
    raw = body.get("provider")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest("provider must be an object", param="provider")
    allow = raw.get("allow_fallbacks", True)
    if allow is None:
        allow = True
    if not isinstance(allow, bool):
        raise InvalidRequest(
            "provider.allow_fallbacks must be a boolean", param="provider.allow_fallbacks"
        )
    return Preferences(
        order=_names(raw["order"], "provider.order") if raw.get("order") is not None else (),
        only=_names(raw["only"], "provider.only") if raw.get("only") is not None else None,
        ignore=_names(raw["ignore"], "provider.ignore") if raw.get("ignore") is not None else (),
        allow_fallbacks=allow,
    )


def without_provider(body: dict[str, Any], *, model: str | None = None) -> bytes:
    """The body to forward, re-encoded: `provider` removed and, for `name/model`, the model as
    that upstream names it. Callers use it only when one of those changes the body."""
    forwarded = {k: v for k, v in body.items() if k != "provider"}
    if model is not None:
        forwarded["model"] = model
    # ASCII escapes: a string may hold a lone surrogate (from a JSON escape) UTF-8 cannot carry.
    return json.dumps(forwarded, separators=(",", ":")).encode()
