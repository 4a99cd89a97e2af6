"""Redis killed and restarted under a running proxy: fail closed answers 503, fail open admits
keys it knows, usage waits in the spool and lands exactly once, and both recover by themselves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ProxyServer, RedisServer, mock_upstream_server, proxy_server, wait_for

ADMIN = "outage-admin-token"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


class Outage:
    def __init__(self, redis: RedisServer, closed: ProxyServer, open_: ProxyServer) -> None:
        self.redis = redis
        self.closed = closed
        self.open = open_

    def create_key(self, **fields: Any) -> dict[str, Any]:
        response = httpx.post(
            self.closed.url + "/admin/keys",
            json={"name": "outage", **fields},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert response.status_code == 201, response.text
        record: dict[str, Any] = response.json()
        return record

    def export(self) -> list[dict[str, Any]]:
        response = httpx.get(
            self.closed.url + "/admin/usage/export",
            params={"since": "0"},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert response.status_code == 200
        return [json.loads(line) for line in response.text.splitlines()]


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
            env = {
                "TOLLGATE_REDIS_URL": redis.url,
                "TOLLGATE_UPSTREAM_URL": upstream,
                "TOLLGATE_ADMIN_TOKEN": ADMIN,
                "TOLLGATE_LOG_LEVEL": "warning",
            }
            closed_env = {**env, "TOLLGATE_SPOOL_DIR": str(tmp_path / "closed")}
            open_env = {**env, "TOLLGATE_FAIL_MODE": "open",
                        "TOLLGATE_SPOOL_DIR": str(tmp_path / "open")}  # fmt: skip
            with proxy_server(env=closed_env) as closed, proxy_server(env=open_env) as open_:
                yield Outage(redis, closed, open_)
    finally:
        redis.cleanup()


def test_fail_closed_answers_503_and_recovers_when_redis_returns(outage: Outage) -> None:
    key = outage.create_key(rpm=100)["key"]
    assert chat(outage.closed, key).status_code == 200
    outage.redis.stop()
    response = chat(outage.closed, key)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(outage.closed.url + "/readyz/store").status_code == 503
    # Still ready: a Redis outage must not take every replica out of the load balancer.
    assert httpx.get(outage.closed.url + "/readyz").status_code == 200
    assert httpx.get(outage.closed.url + "/healthz").status_code == 200
    admin = {"authorization": f"Bearer {ADMIN}"}
    for path in ("/admin/keys", "/admin/keys/0123456789abcdef/usage", "/admin/usage/export"):
        answer = httpx.get(outage.closed.url + path, headers=admin, timeout=20)
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["error"]["type"] == "service_unavailable"
    outage.redis.start()
    wait_for(lambda: chat(outage.closed, key).status_code == 200, what="recovery")
    assert httpx.get(outage.closed.url + "/readyz/store").status_code == 200


def test_fail_open_admits_known_keys_refuses_unknown_and_spools_usage(outage: Outage) -> None:
    known = outage.create_key(rpm=1000)["key"]
    never_seen = outage.create_key(rpm=1000)["key"]
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
        return ids <= {record["request_id"] for record in outage.export()}

    wait_for(landed, timeout_s=30, what="spooled usage to be replayed")
    records = [r for r in outage.export() if r["request_id"] in ids]
    assert len(records) == 3  # each exactly once
    assert all(r["usage_source"] == "upstream" and r["total_tokens"] > 0 for r in records)
    wait_for(
        lambda: (
            "tollgate_spooled_usage_records 0.0" in httpx.get(outage.open.url + "/metrics").text
        ),
        what="the spool gauge to drain",
    )
