"""Redis killed and restarted under a running proxy: fail closed answers 503, fail open admits
keys it knows, usage waits in the spool and lands exactly once, and both recover by themselves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.admin_client import Admin
from tests.servers import (
    ProxyServer,
    RedisServer,
    mock_upstream_server,
    proxy_server,
    tollgate_env,
    wait_for,
)

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


class Outage:
    def __init__(
        self, redis: RedisServer, closed: ProxyServer, open_: ProxyServer, admin: Admin
    ) -> None:
        self.redis = redis
        self.closed = closed
        self.open = open_
        self.admin = admin  # of the fail-closed proxy


def chat(proxy: ProxyServer, key: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        json=BODY,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    redis = RedisServer(persistent=True)
    redis.start()
    try:
        with mock_upstream_server() as upstream:
            closed_env = tollgate_env(
                redis_url=redis.url, upstream_url=upstream, spool_dir=tmp_path / "closed"
            )
            open_env = tollgate_env(
                redis_url=redis.url,
                upstream_url=upstream,
                spool_dir=tmp_path / "open",
                TOLLGATE_FAIL_MODE="open",
            )
            with (
                proxy_server(env=closed_env) as closed,
                proxy_server(env=open_env) as open_,
                Admin(closed.url) as admin,
            ):
                yield Outage(redis, closed, open_, admin)
    finally:
        redis.cleanup()


def test_fail_closed_answers_503_and_recovers_when_redis_returns(outage: Outage) -> None:
    key = outage.admin.create_key(name="outage", rpm=100)["key"]
    assert chat(outage.closed, key).status_code == 200
    outage.redis.stop()
    response = chat(outage.closed, key)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(outage.closed.url + "/readyz/store").status_code == 503
    # Still ready: a Redis outage must not take every replica out of the load balancer.
    assert httpx.get(outage.closed.url + "/readyz").status_code == 200
    assert httpx.get(outage.closed.url + "/healthz").status_code == 200
    for path in ("/admin/keys", "/admin/keys/0123456789abcdef/usage", "/admin/usage/export"):
        answer = outage.admin.client.get(path, timeout=20)
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["error"]["type"] == "service_unavailable"
    outage.redis.start()
    wait_for(lambda: chat(outage.closed, key).status_code == 200, what="recovery")
    assert httpx.get(outage.closed.url + "/readyz/store").status_code == 200


def test_fail_open_admits_known_keys_refuses_unknown_and_spools_usage(outage: Outage) -> None:
    known = outage.admin.create_key(name="outage", rpm=1000)["key"]
    never_seen = outage.admin.create_key(name="outage", rpm=1000)["key"]
    assert chat(outage.open, known).status_code == 200
    outage.redis.stop()
    during = [chat(outage.open, known) for _ in range(3)]
    assert [r.status_code for r in during] == [200, 200, 200]
    assert chat(outage.open, never_seen).status_code == 503
    metrics = httpx.get(outage.open.url + "/metrics").text
    assert "tollgate_fail_open_admissions_total 3.0" in metrics
    assert "tollgate_spooled_usage_records 3.0" in metrics
    outage.redis.start()
    ids = {r.headers["x-request-id"] for r in during}

    def landed() -> bool:
        return ids <= {record["request_id"] for record in outage.admin.export(since=0)}

    wait_for(landed, timeout_s=30, what="spooled usage to be replayed")
    records = [r for r in outage.admin.export(since=0) if r["request_id"] in ids]
    assert len(records) == 3  # each exactly once
    assert all(r["usage_source"] == "upstream" and r["total_tokens"] > 0 for r in records)
    wait_for(
        lambda: (
            "tollgate_spooled_usage_records 0.0" in httpx.get(outage.open.url + "/metrics").text
        ),
        what="the spool gauge to drain",
    )
