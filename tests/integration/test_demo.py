"""`tollgate demo` as a newcomer runs it: the printed key works with curl-style HTTP and the
OpenAI SDK, and a 429 and a 402 show up within a minute."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.servers import ProxyServer, proxy_server, wait_for

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[ProxyServer, str]]:
    env = {"TOLLGATE_REDIS_URL": "", "TOLLGATE_LOG_LEVEL": "warning"}
    with proxy_server(env=env, args=["demo", "--port", "{port}"]) as server:
        wait_for(lambda: "sk-tg-" in server.output(), what="the demo banner")
        match = re.search(r"sk-tg-[0-9a-f]{16}_[A-Za-z0-9_-]{43}", server.output())
        assert match is not None
        yield server, match.group(0)


def test_demo_prints_a_working_key_and_snippets(demo: tuple[ProxyServer, str]) -> None:
    server, key = demo
    banner = server.output()
    assert f"http://127.0.0.1:{server.port}/v1/chat/completions" in banner
    assert f'OpenAI(base_url="http://127.0.0.1:{server.port}/v1", api_key="{key}")' in banner
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    with client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from the Tollgate mock upstream")
    assert chunks[-1].usage is not None


def test_demo_shows_a_402_then_a_429(demo: tuple[ProxyServer, str]) -> None:
    server, key = demo
    headers = {"authorization": f"Bearer {key}"}
    url = server.url + "/v1/chat/completions"
    expensive = httpx.post(url, json={**BODY, "model": "gpt-4o"}, headers=headers)
    assert expensive.status_code == 402
    assert expensive.json()["error"]["code"] == "insufficient_credits"
    statuses = [httpx.post(url, json=BODY, headers=headers).status_code for _ in range(6)]
    assert 429 in statuses
    assert statuses[0] == 200
