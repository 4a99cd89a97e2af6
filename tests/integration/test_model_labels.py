"""Every worker labels a request's model the same way, whether or not a client ever asked it for
the model list: the upstream's list is loaded at startup and refreshed in every process."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.admin_client import Admin
from tests.integration.conftest import MESSAGES, Mock
from tests.servers import RedisServer, proxy_server, tollgate_env


def test_upstream_model_is_labelled_alike_by_both_workers(
    redis_store: RedisServer, mock: Mock, tmp_path: Path
) -> None:
    env = tollgate_env(
        redis_url=redis_store.url, upstream_url=mock.url, spool_dir=tmp_path / "spool"
    )
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]
    with proxy_server(env=env, args=args) as proxy:
        with Admin(proxy.url) as admin:
            key = admin.create_key(name="labels")["key"]
        body = {"model": "mock-slow", "messages": MESSAGES}  # listed upstream, not priced
        for _ in range(30):  # a fresh connection each, so both workers serve some
            response = httpx.post(
                proxy.url + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
                timeout=20,
            )
            assert response.status_code == 200, response.text
        text = httpx.get(proxy.url + "/metrics", timeout=10).text
    samples = [
        line
        for line in text.splitlines()
        if line.startswith("tollgate_requests_total{") and 'route="chat_completions"' in line
    ]
    assert samples
    assert all('model="mock-slow"' in line for line in samples), samples
    total = sum(float(line.rsplit(" ", 1)[1]) for line in samples)
    assert total == 30
