"""Shared fixtures: settings, the in-process store (fakeredis with Lua), the mock upstream
(in-process for unit tests) and a client for the app; real servers come from tests/servers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.config import Settings
from proxy.gateway import Gateway
from proxy.mock_upstream import MockState, create_mock_upstream
from proxy.store import Store, embedded_client
from tests.servers import ADMIN_TOKEN


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

    def chat(self, key: str, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        payload = body if body is not None else {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hello"}],
        }  # fmt: skip
        headers = {"authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return self.client.post("/v1/chat/completions", json=payload, headers=headers, **kwargs)


def make_harness(settings: Settings, mock_state: MockState) -> Iterator[Harness]:
    transport = httpx.ASGITransport(app=create_mock_upstream(mock_state))
    store = Store(embedded_client())
    app = create_app(settings, store=store, transport=transport)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Harness(client, mock_state)


@pytest.fixture
def harness(settings: Settings, mock_state: MockState) -> Iterator[Harness]:
    yield from make_harness(settings, mock_state)


@pytest.fixture
def harness_factory(mock_state: MockState) -> Any:
    """For tests that need other settings: `with harness_factory(settings, **changes) as h`."""
    from contextlib import contextmanager

    @contextmanager
    def build(base: Settings, **changes: Any) -> Iterator[Harness]:
        yield from make_harness(replace(base, **changes), mock_state)

    return build


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
