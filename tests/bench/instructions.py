"""Benchmark: CPU instructions per request of Tollgate's request path, counted by callgrind.

Instruction counts do not move with what else the machine is doing, so two versions can be
compared on a busy machine. Each measurement runs the app in process (a real redis-server, an
in-process upstream, httpx's ASGI client) under `valgrind --tool=callgrind` twice, with a small
and a larger number of requests; the difference divided by the extra requests is one request's
cost, start-up excluded. It counts the proxy process only (not Redis), and the ASGI client's
share too (the same in every version). Requests and answers are the HTTP benchmark's (a chat
JSON request, and its three 20-chunk streams: chat, Responses, Anthropic Messages), so their
counts explain its CPU figures. Loopback only, bounded by --requests.

Run: .venv/bin/python -m tests.bench.instructions [--requests 300]
         [--traffic json stream responses-stream messages-stream json-3-upstreams]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.bench.http import request_body, upstream_answer
from tests.servers import ADMIN_TOKEN, redis_server

# --traffic -> the HTTP benchmark's traffic (its request body and its upstream's answer).
TRAFFIC = {
    "json": "json",
    "stream": "stream",
    "responses-stream": "responses",
    "messages-stream": "messages",
    "json-3-upstreams": "json",  # routed among three upstreams: two match, the first answers
}
THREE_UPSTREAMS = (("claude", "claude-*"), ("primary", "gpt-*"), ("backup", "*"))
_PATHS = {"responses": "/v1/responses", "messages": "/v1/messages"}  # else /v1/chat/completions
WARMUP = 50


def _upstream(request: httpx.Request) -> httpx.Response:
    """The HTTP benchmark's mock upstream, in process: the same bytes for the same request."""
    path = request.url.path
    if path.endswith("/models"):
        return httpx.Response(200, json={"object": "list", "data": []})
    if path.endswith("/responses"):
        traffic = "responses"
    elif path.endswith("/messages"):
        traffic = "messages"
    else:
        traffic = "stream" if b'"stream":true' in request.content.replace(b" ", b"") else "json"
    if traffic == "json":
        headers = {"content-type": "application/json"}
        return httpx.Response(200, content=upstream_answer(traffic), headers=headers)
    return httpx.Response(
        200,
        stream=httpx.ByteStream(upstream_answer(traffic)),
        headers={"content-type": "text/event-stream"},
    )


async def drive(requests: int, name: str, redis_url: str, spool: str) -> None:
    """The measured process: `requests` requests of the traffic `name` (one of TRAFFIC's keys)
    through the app, after a warm-up."""
    from proxy.app import create_app
    from proxy.config import Settings
    from proxy.registry import UpstreamConfig
    from proxy.store import open_store

    traffic = TRAFFIC[name]
    upstreams = tuple(
        UpstreamConfig(
            name=upstream, url=f"http://{upstream}.test/v1", api_key="sk-upstream",
            models=(pattern,), priority=priority,
        )
        for priority, (upstream, pattern) in enumerate(THREE_UPSTREAMS)
    ) if name == "json-3-upstreams" else ()  # fmt: skip
    settings = Settings(
        upstream_url="http://upstream.test/v1",
        upstream_api_key="sk-upstream",
        admin_token=ADMIN_TOKEN,
        redis_url=redis_url,
        spool_dir=Path(spool),
        upstreams=upstreams,
        models_cache_s=10**6,  # no model-list refresh (one fetch per upstream) inside a run
    )
    app = create_app(settings, store=open_store(settings), transport=httpx.MockTransport(_upstream))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tollgate") as client:
            created = await client.post(
                "/admin/keys",
                json={"name": "bench", "rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6,
                      "credits": 10**6},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )  # fmt: skip
            headers = {
                "authorization": f"Bearer {created.json()['key']}",
                "content-type": "application/json",
            }
            path = _PATHS.get(traffic, "/v1/chat/completions")
            body = request_body(traffic)
            for index in range(WARMUP + requests):
                answer = await client.post(path, content=body, headers=headers)
                if answer.status_code != 200:
                    raise SystemExit(f"unexpected {answer.status_code}: {answer.text}")
                if index == 0 and traffic != "json" and answer.content != upstream_answer(traffic):
                    raise SystemExit(f"the {traffic} stream was not relayed byte for byte")
                if index == 0 and upstreams and answer.headers["x-tollgate-upstream"] != "primary":
                    raise SystemExit("the three-upstream traffic was not answered by `primary`")


def _instructions(requests: int, traffic: str, redis_url: str, valgrind: str) -> int:
    with tempfile.TemporaryDirectory(prefix="tollgate-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-m", "tests.bench.instructions", "--drive", str(requests),
            "--traffic", traffic, "--redis-url", redis_url, "--spool", str(Path(tmp) / "spool"),
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            raise SystemExit(f"callgrind run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        if found is None:
            raise SystemExit("no instruction total in the callgrind output")
        return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="extra requests (10-5000)")
    parser.add_argument("--traffic", nargs="+", choices=tuple(TRAFFIC), default=list(TRAFFIC))
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--spool", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.drive is not None:  # the process callgrind measures
        asyncio.run(drive(options.drive, options.traffic[0], options.redis_url, options.spool))
        return 0
    if not 10 <= options.requests <= 5000:
        parser.error("--requests must be 10-5000")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    counts: dict[str, float] = {}
    with redis_server() as redis:
        for traffic in options.traffic:
            base = _instructions(1, traffic, redis.url, valgrind)
            more = _instructions(1 + options.requests, traffic, redis.url, valgrind)
            counts[traffic] = per_request = (more - base) / options.requests
            line = f"{traffic:16} {per_request / 1000:,.0f} k instructions per request"
            if traffic.endswith("-stream") and counts.get("stream"):
                line += f" ({per_request / counts['stream']:.3f} x the chat stream's)"
            if traffic == "json-3-upstreams" and counts.get("json"):
                line += f" ({per_request / counts['json']:.3f} x one upstream's)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
