"""Real servers shared by the integration tests: one redis-server, one mock upstream (uvicorn)
and one `tollgate serve` subprocess wired to both, plus a client for the mock's inspection
routes (the admin client is tests/admin_client.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_client import Admin
from tests.servers import (
    ProxyServer,
    RedisServer,
    mock_upstream_server,
    proxy_server,
    tollgate_env,
)

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def new_request_id() -> str:
    return "it-" + uuid.uuid4().hex


class Mock:
    """The mock upstream process: its base URL (…/v1) and its /_mock/* inspection routes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = url.removesuffix("/v1")
        self.client = httpx.Client(base_url=self.root, timeout=10)

    def state(self) -> dict[str, Any]:
        response = self.client.get("/_mock/requests")
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    def received(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.state()["requests"]
        return requests

    def open_streams(self) -> int:
        return int(self.state()["open_streams"])

    def release(self, n: int = 1) -> None:
        self.client.post("/_mock/release", params={"n": n}).raise_for_status()

    def fault(self, **spec: Any) -> None:
        """Make every generating route fail as `spec` says (POST /_mock/fault): `status=503`,
        `stall=True`, optionally `count=n` for the next n requests only."""
        self.client.post("/_mock/fault", json=spec).raise_for_status()

    def clear_fault(self) -> None:
        self.client.post("/_mock/fault", json={}).raise_for_status()

    def request_with_id(self, request_id: str) -> dict[str, Any]:
        """What the upstream received for the proxied request with this id: Tollgate's own
        (`x-request-id`) or the one the client sent (`x-client-request-id`)."""
        found = [
            r
            for r in self.received()
            if request_id
            in (r["headers"].get("x-request-id"), r["headers"].get("x-client-request-id"))
        ]
        assert len(found) == 1, f"upstream saw {len(found)} requests with id {request_id}"
        return found[0]


@dataclass
class Stack:
    redis: RedisServer
    mock: Mock
    proxy: ProxyServer
    admin: Admin

    @property
    def url(self) -> str:
        return self.proxy.url


@contextmanager
def running_stack(redis: RedisServer, mock: Mock, spool_dir: Path, **extra: str) -> Iterator[Stack]:
    """A `tollgate serve` on the shared Redis and mock, with extra TOLLGATE_* settings."""
    env = tollgate_env(redis_url=redis.url, upstream_url=mock.url, spool_dir=spool_dir, **extra)
    with proxy_server(env=env) as proxy, Admin(proxy.url) as admin:
        yield Stack(redis=redis, mock=mock, proxy=proxy, admin=admin)


@pytest.fixture(scope="session")
def redis_store(real_redis: RedisServer) -> RedisServer:
    return real_redis


@contextmanager
def running_mock(tag: str | None = None) -> Iterator[Mock]:
    """The mock upstream as a real process, with its inspection client; `tag` names it in an
    `x-mock-upstream` header on every answer."""
    with mock_upstream_server(tag) as url:
        mock = Mock(url)
        try:
            yield mock
        finally:
            mock.client.close()


@pytest.fixture(scope="session")
def mock() -> Iterator[Mock]:
    with running_mock() as mock:
        yield mock


@pytest.fixture(scope="session")
def stack(
    redis_store: RedisServer, mock: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    spool = tmp_path_factory.mktemp("spool")
    with running_stack(redis_store, mock, spool) as stack:
        yield stack


@pytest.fixture
def key(stack: Stack, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh key without limits or balance, named after the test."""
    return stack.admin.create_key(name=request.node.name[:200])


@pytest.fixture
def since() -> float:
    """The test's start, for usage windows."""
    return time.time()


@pytest.fixture
def client(stack: Stack, key: dict[str, Any]) -> Iterator[httpx.Client]:
    """Raw httpx against the proxy, authenticated with the test's key."""
    with httpx.Client(
        base_url=stack.url, headers={"authorization": f"Bearer {key['key']}"}, timeout=20
    ) as client:
        yield client
