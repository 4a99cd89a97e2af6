"""The upstreams' model lists, merged: fetched at startup and refreshed in every process.

`GET /v1/models` answers from it, and metrics label a request's model by it (plus the price
table), so every worker labels the same request the same way, whatever its clients asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from proxy.errors import UpstreamFailed, UpstreamTimeout
from proxy.metrics import Metrics
from proxy.upstream import Upstream

log = logging.getLogger("tollgate")
STARTUP_FETCH_S = 5.0  # how long startup waits for the first list before serving without it
MAX_LABELLED_MODELS = 10_000  # the metrics' model label set stays bounded whatever the upstream


class ModelCatalog:
    """This process's copy of the model lists of the OpenAI-dialect upstreams, merged.

    Each upstream's last good list is kept by its name, so an upstream that cannot answer a
    round (counted in the upstream error metric) keeps serving the list it last gave; one that
    never answered contributes nothing. A round none answers is a failure and changes nothing.
    """

    def __init__(
        self, upstreams: list[Upstream], metrics: Metrics, *, refresh_s: float, timeout_s: float
    ) -> None:
        # Stable by priority: the first upstream to name a model gives its entry.
        self.upstreams = sorted(upstreams, key=lambda u: u.config.priority)
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.models: list[dict[str, Any]] | None = None  # None until a fetch succeeded
        self._lists: dict[str, list[dict[str, Any]]] = {}  # upstream name -> its last good list

    async def current(self) -> list[dict[str, Any]]:
        """The list the background refresh keeps; fetched now only when there is none yet."""
        if self.models is not None:
            return self.models
        return await self.fetch(self.timeout_s)

    async def start(self) -> None:
        """The first fetch, bounded, before the process serves; failing it is not fatal."""
        try:
            await self.fetch(STARTUP_FETCH_S)
        except Exception as exc:  # the refresh loop tries again
            log.warning("could not fetch the upstream model list at startup: %s", exc)

    async def fetch(self, timeout_s: float) -> list[dict[str, Any]]:
        """Ask every upstream for its list at once, keep each answer, and merge the kept lists:
        the first upstream by priority to name a model wins its entry."""
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_answer(u, timeout_s)) for u in self.upstreams]
        failure: UpstreamFailed | UpstreamTimeout | None = None
        answered = False
        for upstream, task in zip(self.upstreams, tasks, strict=True):
            if isinstance(answer := task.result(), list):
                self._lists[upstream.name] = answer
                answered = True
            else:
                failure = failure or answer
        if not answered:  # the kept lists (and `models`) stay as they were
            raise failure or UpstreamFailed("No upstream serves a model list", reason="invalid")
        merged: dict[str, dict[str, Any]] = {}
        for upstream in self.upstreams:
            for model in self._lists.get(upstream.name, ()):
                merged.setdefault(model["id"], model)
        self.models = list(merged.values())
        room = MAX_LABELLED_MODELS - len(self.metrics.known_models)
        self.metrics.known_models.update(list(merged)[: max(room, 0)])
        return self.models

    async def refresh_forever(self) -> None:
        """Refresh the list every `refresh_s`; an upstream that fails a round keeps its list."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.fetch(self.timeout_s)
            except (UpstreamFailed, UpstreamTimeout) as exc:
                log.warning("could not refresh the upstream model list: %s", exc.message)
            except Exception:  # a refresh round must never kill the loop
                log.exception("model list refresh failed")


async def _answer(
    upstream: Upstream, timeout_s: float
) -> list[dict[str, Any]] | UpstreamFailed | UpstreamTimeout:
    """One upstream's list, or why it gave none (already counted by `failures()`)."""
    try:
        return await _fetch_one(upstream, timeout_s)
    except (UpstreamFailed, UpstreamTimeout) as exc:
        return exc


async def _fetch_one(upstream: Upstream, timeout_s: float) -> list[dict[str, Any]]:
    headers = upstream.headers([], request_id="models")
    with upstream.failures(timeout_s):
        async with asyncio.timeout(timeout_s):
            response = await upstream.send("GET", "/models", headers=headers, content=None)
            payload = await response.aread()
        models = _model_list(payload) if response.status_code == 200 else None
        if models is None:
            reason = "status" if response.status_code != 200 else "invalid"
            raise UpstreamFailed("Upstream did not answer with a model list", reason=reason)
    return models


def _model_list(payload: bytes) -> list[dict[str, Any]] | None:
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    data = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(data, list):
        return None
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
