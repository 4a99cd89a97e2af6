"""Shared fixtures: settings, the in-process store (fakeredis with Lua), the mock upstream
(in-process for unit tests), a client for the app and a key on it; real servers come from
tests/servers.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, Literal

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.config import Settings
from proxy.gateway import Gateway
from proxy.mock_upstream import MockState, create_mock_upstream
from proxy.store import Store, embedded_client
from tests.servers import ADMIN_TOKEN

HELLO: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
# What the app's upstream hop talks to: the in-process mock upstream, the real transport (to
# settings.upstream_url) or a transport of the test's own (an httpx.MockTransport handler).
Upstream = Literal["mock", "real"] | httpx.AsyncBaseTransport


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings(
        upstream_url="http://upstream.test/v1",
        upstream_api_key="sk-upstream-secret",
        admin_token=ADMIN_TOKEN,
        spool_dir=tmp_path / "spool",
    )


@pytest.fixture
def mock_state() -> MockState:
    return MockState()


class Harness:
    """The app under test with its in-process store and mock upstream, plus shortcuts."""

    def __init__(self, client: TestClient, mock: MockState) -> None:
        self.client = client
        self.mock = mock

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.client.app.state.gateway  # type: ignore[attr-defined]
        return gateway

    def run(self, coroutine_function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a coroutine on the app's event loop (where its store client lives)."""
        assert self.client.portal is not None
        return self.client.portal.call(lambda: coroutine_function(*args, **kwargs))

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def create_key(self, **fields: Any) -> dict[str, Any]:
        response = self.admin("POST", "/admin/keys", json={"name": "test", **fields})
        assert response.status_code == 201, response.text
        record: dict[str, Any] = response.json()
        return record

    def key_usage(self, key_id: str) -> dict[str, Any]:
        """The key's usage by model over the default window."""
        response = self.admin("GET", f"/admin/keys/{key_id}/usage?group_by=model")
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def export(self) -> list[dict[str, Any]]:
        """Every usage record of the default window."""
        response = self.admin("GET", "/admin/usage/export")
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line]

    def chat(self, key: str, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        payload = body if body is not None else {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hello"}],
        }  # fmt: skip
        headers = {"authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return self.client.post("/v1/chat/completions", json=payload, headers=headers, **kwargs)


def make_harness(
    settings: Settings, mock_state: MockState, upstream: Upstream = "mock"
) -> Iterator[Harness]:
    transport: httpx.AsyncBaseTransport | None
    if isinstance(upstream, httpx.AsyncBaseTransport):
        transport = upstream
    elif upstream == "real":
        transport = None  # the app builds its own
    else:
        transport = httpx.ASGITransport(app=create_mock_upstream(mock_state))
    store = Store(embedded_client())
    app = create_app(settings, store=store, transport=transport)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Harness(client, mock_state)


@pytest.fixture
def harness(settings: Settings, mock_state: MockState) -> Iterator[Harness]:
    yield from make_harness(settings, mock_state)


HarnessFactory = Callable[..., AbstractContextManager[Harness]]


@pytest.fixture
def harness_factory(mock_state: MockState) -> HarnessFactory:
    """For tests that need other settings or another upstream:
    `with harness_factory(settings, upstream=httpx.MockTransport(handler), **changes) as h`."""

    @contextmanager
    def build(base: Settings, *, upstream: Upstream = "mock", **changes: Any) -> Iterator[Harness]:
        yield from make_harness(replace(base, **changes), mock_state, upstream)

    return build


@pytest.fixture
def key(harness: Harness) -> str:
    """The secret of a fresh key without limits or balance on `harness`."""
    secret: str = harness.create_key()["key"]
    return secret


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def real_redis() -> Iterator[Any]:
    """One real redis-server for the whole run (tests use their own key ids)."""
    from tests.servers import redis_server

    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[Any]:
    """One real 3-master Redis Cluster for the whole run."""
    from tests.servers import redis_cluster

    with redis_cluster() as nodes:
        yield nodes
