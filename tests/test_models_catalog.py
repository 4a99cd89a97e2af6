"""The model catalog: each upstream's last good list, merged by priority and deduplicated by id,
kept through the rounds that upstream cannot answer; `GET /v1/models/{id}` finds a model on any
upstream."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from proxy.config import Settings
from proxy.errors import UpstreamFailed
from proxy.metrics import Metrics
from proxy.models import ModelCatalog
from proxy.registry import UpstreamConfig
from proxy.upstream import Upstream
from tests.conftest import HarnessFactory, bearer

pytestmark = pytest.mark.anyio


class _Upstreams:
    """Model lists by upstream host; a host listed in `down` refuses connections."""

    def __init__(self, lists: dict[str, list[str]]) -> None:
        self.lists = lists
        self.down: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("refused", request=request)
        data = [{"id": m, "object": "model", "owned_by": host} for m in self.lists[host]]
        return httpx.Response(200, json={"object": "list", "data": data})


def _catalog(upstreams: _Upstreams, priorities: dict[str, int]) -> tuple[ModelCatalog, Metrics]:
    settings = Settings()
    metrics = Metrics(key_label=False, known_models=set())
    transport = httpx.MockTransport(upstreams)
    configs = [
        UpstreamConfig(name=name, url=f"http://{name}.test/v1", priority=priority)
        for name, priority in priorities.items()
    ]
    catalog = ModelCatalog(
        [Upstream(c, settings, metrics, transport=transport) for c in configs],
        metrics,
        refresh_s=30.0,
        timeout_s=5.0,
    )
    return catalog, metrics


def _listed(models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["id"], m["owned_by"]) for m in models]


def _connect_errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "tollgate_upstream_errors_total", {"reason": "connect"}
    )
    return value or 0.0


async def test_two_upstreams_are_merged_and_the_first_by_priority_wins_a_shared_id() -> None:
    upstreams = _Upstreams({"backup.test": ["shared", "o3"], "main.test": ["gpt-4o", "shared"]})
    # The backup is configured first but has the later priority.
    catalog, _ = _catalog(upstreams, {"backup": 2, "main": 1})

    models = await catalog.current()

    assert _listed(models) == [
        ("gpt-4o", "main.test"), ("shared", "main.test"), ("o3", "backup.test"),
    ]  # fmt: skip


async def test_an_upstream_failing_a_round_keeps_its_last_good_list() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    catalog, metrics = _catalog(upstreams, {"a": 1, "b": 2})
    await catalog.fetch(5.0)

    upstreams.down.add("b.test")
    upstreams.lists["a.test"] = ["gpt-4o", "gpt-4.1"]
    models = await catalog.fetch(5.0)

    assert _listed(models) == [("gpt-4o", "a.test"), ("gpt-4.1", "a.test"), ("o3", "b.test")]
    assert await catalog.current() == models
    assert _connect_errors(metrics) == 1


async def test_an_upstream_back_after_a_failed_round_replaces_its_kept_list() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    catalog, _ = _catalog(upstreams, {"a": 1, "b": 2})
    await catalog.fetch(5.0)
    upstreams.down.add("b.test")
    await catalog.fetch(5.0)

    upstreams.down.clear()
    upstreams.lists["b.test"] = ["o4-mini"]
    models = await catalog.fetch(5.0)

    assert _listed(models) == [("gpt-4o", "a.test"), ("o4-mini", "b.test")]


async def test_an_upstream_that_never_answered_contributes_nothing_until_it_does() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    upstreams.down.add("a.test")
    catalog, metrics = _catalog(upstreams, {"a": 1, "b": 2})

    assert _listed(await catalog.fetch(5.0)) == [("o3", "b.test")]
    assert _connect_errors(metrics) == 1

    upstreams.down.clear()
    assert _listed(await catalog.fetch(5.0)) == [("gpt-4o", "a.test"), ("o3", "b.test")]


async def test_when_no_upstream_ever_answered_the_fetch_fails_and_there_is_no_list() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    upstreams.down.update({"a.test", "b.test"})
    catalog, metrics = _catalog(upstreams, {"a": 1, "b": 2})

    with pytest.raises(UpstreamFailed) as failed:
        await catalog.current()

    assert failed.value.reason == "connect"
    assert catalog.models is None
    assert _connect_errors(metrics) == 2


async def test_a_round_no_upstream_answers_fails_and_the_kept_list_is_still_served() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    catalog, _ = _catalog(upstreams, {"a": 1, "b": 2})
    first = await catalog.fetch(5.0)

    upstreams.down.update({"a.test", "b.test"})
    with pytest.raises(UpstreamFailed):
        await catalog.fetch(5.0)

    assert await catalog.current() == first
    assert _listed(first) == [("gpt-4o", "a.test"), ("o3", "b.test")]


async def test_the_merged_ids_become_known_model_labels() -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    catalog, metrics = _catalog(upstreams, {"a": 1, "b": 2})

    await catalog.fetch(5.0)

    assert metrics.known_models >= {"gpt-4o", "o3"}


def test_get_model_finds_a_model_of_any_upstream_also_after_its_upstream_failed_a_round(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    upstreams = _Upstreams({"a.test": ["gpt-4o"], "b.test": ["o3"]})
    configs = tuple(
        UpstreamConfig(name=name, url=f"http://{name}.test/v1", priority=priority)
        for name, priority in (("a", 1), ("b", 2))
    )
    transport = httpx.MockTransport(upstreams)
    with harness_factory(settings, upstream=transport, upstreams=configs) as harness:
        key = harness.create_key()["key"]
        found = harness.client.get("/v1/models/o3", headers=bearer(key))
        assert found.status_code == 200
        assert (found.json()["id"], found.json()["owned_by"]) == ("o3", "b.test")

        upstreams.down.add("b.test")
        harness.run(harness.gateway.models.fetch, 5.0)

        kept = harness.client.get("/v1/models/o3", headers=bearer(key))
        assert kept.status_code == 200
        assert kept.json()["owned_by"] == "b.test"
        missing = harness.client.get("/v1/models/o4", headers=bearer(key))
        assert missing.status_code == 404
