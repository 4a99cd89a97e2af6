"""`tollgate demo` as a newcomer runs it: the printed key works with curl-style HTTP and the
OpenAI SDK, the printed SDK snippets run as they are, and a 429 and a 402 show up within a
minute."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.servers import ProxyServer, free_port, proxy_server, wait_for

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


def snippet(banner: str, heading: str) -> str:
    """The indented code the banner prints under `heading`, as a newcomer would copy it."""
    block = banner.split(f"\n{heading}\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def test_demo_responses_snippet_runs_as_printed(demo: tuple[ProxyServer, str]) -> None:
    server, key = demo
    code = snippet(server.output(), "OpenAI SDK, Responses API:")
    assert f'OpenAI(base_url="http://127.0.0.1:{server.port}/v1", api_key="{key}")' in code
    assert "client.responses.create(" in code
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello from the Tollgate mock upstream"), done.stdout


def test_demo_anthropic_snippet_runs_as_printed(demo: tuple[ProxyServer, str]) -> None:
    server, key = demo
    code = snippet(server.output(), "Anthropic SDK (pip install anthropic):")
    assert f'Anthropic(base_url="http://127.0.0.1:{server.port}", api_key="{key}")' in code
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello from the Tollgate mock upstream"), done.stdout


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


def test_demo_output_has_no_warnings_or_tracebacks(demo: tuple[ProxyServer, str]) -> None:
    """The mock upstream listens before the proxy starts, so fetching its model list works."""
    server, key = demo
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {key}"})

    noisy = [
        line for line in server.output().splitlines()
        if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception", line)
    ]  # fmt: skip
    assert noisy == []


def test_demo_on_a_busy_port_is_one_line_and_status_1() -> None:
    with socket.create_server(("127.0.0.1", free_port())) as taken:
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"tollgate: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
