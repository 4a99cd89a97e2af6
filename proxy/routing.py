"""Upstream selection: for a surface and a model, the upstreams to try, in order.

Today one upstream serves every surface and model; several upstreams with fallback are a new
implementation of `Selection`, not new branches in the request path.
"""

from __future__ import annotations

from typing import Protocol

from proxy.surfaces.base import Surface
from proxy.upstream import Upstream


class Selection(Protocol):
    def candidates(self, surface: Surface, model: str) -> list[Upstream]:
        """The upstreams that may serve this request, best first (never empty)."""
        ...


class SingleUpstream:
    """The one configured upstream (`TOLLGATE_UPSTREAM_URL`) for everything."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._only = [upstream]

    def candidates(self, surface: Surface, model: str) -> list[Upstream]:
        return self._only
