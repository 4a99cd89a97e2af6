"""Upstream selection: for a surface and a model, the upstreams to try, in order.

A surface goes only to upstreams of its dialect (`openai` | `anthropic`) whose model patterns
match, lowest `priority` first. Fallback across several candidates is a matter of the caller
trying them in this order; today the first one serves.
"""

from __future__ import annotations

from typing import Protocol

from proxy.upstream import Upstream


class Routable(Protocol):
    dialect: str


class Selection(Protocol):
    def candidates(self, surface: Routable, model: str) -> list[Upstream]:
        """The upstreams that may serve this request, best first (empty: none serves it)."""
        ...


class Registry:
    """Every configured upstream, each serving its dialect's surfaces and its models."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        # Stable by priority: among equals, the order of the registry file.
        self.upstreams = sorted(upstreams, key=lambda u: u.config.priority)
        self._by_dialect: dict[str, list[Upstream]] = {}
        for upstream in self.upstreams:
            for dialect in (upstream.api, *upstream.config.also_serves):
                self._by_dialect.setdefault(dialect, []).append(upstream)

    def candidates(self, surface: Routable, model: str) -> list[Upstream]:
        return [u for u in self._by_dialect.get(surface.dialect, ()) if u.config.serves(model)]
