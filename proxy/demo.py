"""`tollgate demo`: the embedded default. In-process store, built-in mock upstream, a demo key.

Everything runs in one process and one event loop: the mock upstream on a free loopback
port, then Tollgate on the chosen port, so a newcomer needs nothing but this package.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

import uvicorn

from proxy.app import create_app
from proxy.config import Settings
from proxy.http_server import http_protocol
from proxy.keys import Keyring
from proxy.mock_upstream import create_mock_upstream
from proxy.store import Store, embedded_client

DEMO_LIMITS = {"rpm": 5, "tpm": 20_000, "max_concurrency": 2}
DEMO_CREDITS_MICROS = 5_000  # $0.005: gpt-4o-mini fits, gpt-4o's worst case does not


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError when it is taken), bound before anything
    starts, so a busy port is one error rather than a half-started demo."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def banner(base_url: str, key: str) -> str:
    return f"""
Tollgate demo is running at {base_url}  (in-process store, built-in mock upstream)

Demo key (rpm=5, tpm=20000, max_concurrency=2, credits $0.005):
  {key}

Try it:
  curl -s {base_url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  # a 402: gpt-4o's worst-case cost is more than the key's balance
  curl -s {base_url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  # a 429: the 6th request within a minute
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w "%{{http_code}}\\n" \\
    {base_url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hi"}}]}}'; done

OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="{key}")
  for chunk in client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hi"}}], stream=True):
      if chunk.choices: print(chunk.choices[0].delta.content or "", end="", flush=True)

OpenAI SDK, Responses API:
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="{key}")
  response = client.responses.create(model="gpt-4o-mini", input="Hi")
  print(response.output_text)

Anthropic SDK (pip install anthropic):
  import anthropic
  client = anthropic.Anthropic(base_url="{base_url}", api_key="{key}")
  message = client.messages.create(model="claude-3-5-haiku-20241022", max_tokens=256,
                                   messages=[{{"role": "user", "content": "Hi"}}])
  print(message.content[0].text)

Press Ctrl+C to stop.
"""


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    """Wait until `server` accepts connections; False when it ended first."""
    while not server.started:
        if task.done():
            return False
        await asyncio.sleep(0.02)
    return True


async def run_demo(settings: Settings, *, sock: socket.socket, host: str) -> None:
    """Serve the demo on `sock` (from `listen`) until Ctrl+C; `host` is what the banner shows."""
    port: int = sock.getsockname()[1]
    mock_sock = listen("127.0.0.1", 0)
    mock_port: int = mock_sock.getsockname()[1]
    settings = replace(settings, upstream_url=f"http://127.0.0.1:{mock_port}/v1")
    store = Store(embedded_client())
    record = await Keyring(store).create(
        name="demo",
        limits=dict(DEMO_LIMITS),
        credits_micros=DEMO_CREDITS_MICROS,
        allowed_models=None,
        metadata={"demo": True},
    )
    mock = uvicorn.Server(uvicorn.Config(create_mock_upstream(), log_level="warning"))
    # The proxy fetches the upstream's model list as it starts: the mock must answer by then.
    mock_task = asyncio.create_task(mock.serve(sockets=[mock_sock]))
    try:
        if not await _started(mock, mock_task):
            return
        proxy = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, store=store),
                http=http_protocol(settings),
                log_level=settings.log_level,
                access_log=False,
                server_header=False,
            )
        )
        proxy_task = asyncio.create_task(proxy.serve(sockets=[sock]))
        if await _started(proxy, proxy_task):
            shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            print(banner(f"http://{shown_host}:{port}", record["key"]), flush=True)
        await proxy_task
    finally:
        mock.should_exit = True
        await mock_task
