"""Upstream selection: for a surface and a model, the upstreams to try, in order.

A model written `name/model` goes to the upstream `name` alone, which is sent `model`. Any other
model goes to the upstreams of the surface's dialect (`openai` | `anthropic`) whose patterns
match, lowest `priority` first; the lifecycle falls back along that list. Pass-through paths
(files, batches, ...) are state kept by one upstream, so they go to the first `openai` one only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.upstream import Upstream

MAX_CACHED_ROUTES = 4096  # model names are the client's choice: the cache stays bounded


class Routable(Protocol):
    route: str
    dialect: str


@dataclass(frozen=True, slots=True)
class Route:
    model: str  # the model as the upstreams are sent it (and as it is metered)
    candidates: tuple[Upstream, ...]  # best first; empty: no upstream serves it


class Selection(Protocol):
    def route(self, surface: Routable, model: str) -> Route:
        """The upstreams that may serve this request, best first, and the model they get."""
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
        self._routes: dict[tuple[str, str, str], Route] = {}

    def route(self, surface: Routable, model: str) -> Route:
        key = (surface.route, surface.dialect, model)
        found = self._routes.get(key)
        if found is None:
            if len(self._routes) >= MAX_CACHED_ROUTES:
                self._routes.clear()
            found = self._routes[key] = self._select(surface, model)
        return found

    def _select(self, surface: Routable, model: str) -> Route:
        serving = self._by_dialect.get(surface.dialect, [])
        if surface.route == "passthrough":
            return Route(model, tuple(self._by_dialect.get("openai", [])[:1]))
        name, slash, rest = model.partition("/")
        if slash and rest:
            named = [u for u in serving if u.name == name]
            if named:
                return Route(rest, tuple(named))
        return Route(model, tuple(u for u in serving if u.config.serves(model)))
