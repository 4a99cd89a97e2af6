"""Benchmark: Tollgate over HTTP next to nginx as a reverse proxy and the upstream alone.

A fast mock upstream (nginx answering a static chat.completion, a chat SSE stream, a Responses
SSE stream or an Anthropic Messages SSE stream), a real redis-server, `tollgate serve` (1 and 2
workers, every feature on), nginx proxying to the same upstream and, with --litellm, LiteLLM's
proxy (chat only); wrk POSTs chat, Responses and Messages bodies. Loopback only, bounded by
--rounds and --duration; every process it starts is stopped on exit, error or Ctrl-C.
Run: .venv/bin/python -m tests.bench.http [--rounds 3] [--duration 5] [--smoke] [--profile 10]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from tests.admin_client import Admin
from tests.bench import litellm, procfs, pyspy, report
from tests.bench.load import Load, run_wrk, wrk_binary
from tests.bench.nginx import (
    CONTENT_CHUNKS,
    STREAM_HEADER,
    STREAM_PATH_PREFIX,
    Nginx,
    completion_body,
    messages_stream_events,
    nginx_binary,
    nginx_server,
    responses_stream_events,
    stream_events,
)
from tests.servers import REPO, ProxyServer, RedisServer, redis_server, tollgate_env, wait_for

# Chat JSON, chat stream, Responses stream, Anthropic Messages stream; CHAT_TRAFFIC is what a
# chat-only target serves.
TRAFFIC = ("json", "stream", "responses", "messages")
CHAT_TRAFFIC = ("json", "stream")
CONNECTIONS = (1, 32)
WARMUP_S = 2
TRIP_REQUESTS = 200  # requests per traffic type whose Redis commands MONITOR counts
# Commands outside any request that may fall into the counted window: one sweeper pass (SET NX
# of its lock, then TIME, SMEMBERS, a pipeline, HMGET, HGET) or an idle connection's PING.
BACKGROUND_TRIPS = 8
DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "http.json"
DEFAULT_PROFILE = REPO / "tests" / "bench" / "results" / "http-profile.txt"
# The fields of a key whose limits and credits never refuse: every check runs, none says no.
UNLIMITED_KEY = {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6, "credits": 10**6}
_LUA_CALL = re.compile(r"redis\.p?call\(\s*['\"](\w+)['\"]")
_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant. Answer in plain prose only, "
     "without lists or headings."},
    {"role": "user", "content": "Summarise the plot of Hamlet in two sentences, naming the main "
     "characters and what becomes of each of them by the end of the final act. Keep it short."},
]  # fmt: skip


class BenchError(RuntimeError):
    """A target answered wrongly: its figures would not be comparable."""


def request_body(traffic: str) -> bytes:
    """The ~390-byte chat body clients send, streaming adds only `"stream": true`; the
    Responses stream's body says the same as `instructions` and `input`, the Anthropic
    Messages stream's as `system` and `messages`."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": _MESSAGES, "max_tokens": 64,
                            "temperature": 0.2, "user": "bench-user-0001"}  # fmt: skip
    if traffic == "stream":
        body["stream"] = True
    if traffic == "responses":
        body = {"model": "gpt-4o-mini", "instructions": _MESSAGES[0]["content"],
                "input": _MESSAGES[1]["content"], "max_output_tokens": 64, "temperature": 0.2,
                "user": "bench-user-0001", "stream": True}  # fmt: skip
    if traffic == "messages":
        body = {"model": "claude-3-5-haiku-20241022", "max_tokens": 64, "stream": True,
                "system": _MESSAGES[0]["content"], "temperature": 0.2,
                "messages": [_MESSAGES[1]], "metadata": {"user_id": "bench-user-0001"}}  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def upstream_answer(traffic: str) -> bytes:
    """What the mock upstream answers to `traffic`, byte for byte."""
    if traffic == "json":
        return completion_body()
    events = {"stream": stream_events, "responses": responses_stream_events,
              "messages": messages_stream_events}[traffic]()  # fmt: skip
    return b"".join(events)


_PATHS = {"responses": "/responses", "messages": "/messages"}  # any other: /chat/completions


def _urls(base: str, traffics: tuple[str, ...] = TRAFFIC) -> dict[str, str]:
    """traffic -> the POST URL under an OpenAI-style base URL (.../v1)."""
    return {t: base + _PATHS.get(t, "/chat/completions") for t in traffics}


# traffic -> what marks one content event, and how the stream's last event begins.
_STREAM_SHAPES = {
    "stream": (b'"choices":[{', b"data: [DONE]"),
    "responses": (b'"type":"response.output_text.delta"', b"event: response.completed\n"),
    "messages": (b'"type":"content_block_delta"', b"event: message_stop\n"),
}


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    urls: dict[str, str]  # traffic -> the POST URL, for each traffic it serves
    roots: dict[str, int]  # traffic -> the pid whose process tree serves it
    authorization: str
    stream_header: str | None  # sent with streaming requests; None when the URL selects SSE
    exact: bool  # relays the upstream's bytes unchanged (checked before the runs)
    metrics_url: str | None = None  # Tollgate's /metrics: its Redis figures are measured


@contextmanager
def _tollgate(
    directory: Path, *, upstream_url: str, redis_url: str, workers: int
) -> Iterator[ProxyServer]:
    env = tollgate_env(
        redis_url=redis_url,
        upstream_url=upstream_url,
        spool_dir=directory / "spool",
        upstream_api_key="sk-upstream-bench",  # as LiteLLM's config sends it
        TOLLGATE_SHUTDOWN_TIMEOUT="5",
        TOLLGATE_FORWARD_HEADERS="x-bench-stream,x-bench-slow",  # the mock upstream's switches
    )
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", str(workers)]
    server = ProxyServer(env=env, args=args)
    # prometheus-client turns multiprocess mode on when the variable merely exists (even empty,
    # then writing its files to the working directory): set it for several workers only.
    server.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if workers > 1:
        server.env["PROMETHEUS_MULTIPROC_DIR"] = str(directory / "metrics")
    try:  # stopped even when it never became ready
        server.start()
        assert server.process is not None
        root = server.process.pid
        if workers > 1:
            wait_for(lambda: len(procfs.tree(root)) > workers, what=f"{workers} workers")
        yield server
    finally:
        server.stop()
        server.log.close()
        server.log_path.unlink(missing_ok=True)


def _post(target: Target, traffic: str) -> tuple[int, bytes]:
    headers = {"Authorization": target.authorization, "Content-Type": "application/json"}
    if traffic == "stream" and target.stream_header:
        headers[target.stream_header] = "1"
    with (
        httpx.Client(timeout=30, trust_env=False) as client,
        client.stream("POST", target.urls[traffic], content=request_body(traffic),
                      headers=headers) as response,
    ):  # fmt: skip
        return response.status_code, b"".join(response.iter_raw())


def check(target: Target) -> dict[str, Any]:
    """One request of each traffic type, compared with what the upstream itself sends.

    Proxies that relay bytes unchanged must deliver them byte for byte (all CONTENT_CHUNKS
    chunks, the usage chunk and [DONE]); any other target must at least answer 200.
    """
    found: dict[str, Any] = {}
    for traffic in target.urls:
        expected = upstream_answer(traffic)
        status, body = _post(target, traffic)
        events = [e for e in body.split(b"\n\n") if e]
        chunks, done = 0, False
        if traffic in _STREAM_SHAPES:
            content, last = _STREAM_SHAPES[traffic]
            chunks = sum(1 for e in events if content in e)
            done = bool(events) and events[-1].startswith(last)
        found[traffic] = {
            "status": status,
            "bytes": len(body),
            "identical": body == expected,
            "chunks": chunks if traffic != "json" else None,
            "done": bool(done) if traffic != "json" else None,
        }
        if status != 200 or (target.exact and body != expected):
            raise BenchError(
                f"{target.name} answered {traffic} with {status} and a body that differs from "
                f"the upstream's ({chunks} of {CONTENT_CHUNKS} chunks):\n{body[:2000]!r}"
            )
    return found


def script_commands() -> frozenset[str]:
    """Every command Tollgate's Lua scripts issue: INFO commandstats counts those too."""
    scripts = [f for f in (resources.files("proxy") / "lua").iterdir() if f.name.endswith(".lua")]
    return frozenset(
        name.lower() for f in scripts for name in _LUA_CALL.findall(f.read_text(encoding="utf-8"))
    )


def _redis_counts(client: redis.Redis) -> dict[str, int]:
    info = cast("dict[str, Any]", client.info("commandstats"))
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def _redis_cpu_s(client: redis.Redis) -> float:
    info = cast("dict[str, Any]", client.info("cpu"))
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _served(metrics_url: str) -> int:
    """Requests Tollgate has answered (all workers), from its own counter."""
    text = httpx.get(metrics_url, timeout=10, trust_env=False).text
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tollgate_requests_total{")))  # fmt: skip


def _quiet(client: redis.Redis, metrics_url: str) -> tuple[dict[str, int], int]:
    """Redis counts and served requests once requests cut off by wrk's stop have settled."""
    last: tuple[dict[str, int], int] | None = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = (_redis_counts(client), _served(metrics_url))
        if (
            last is not None
            and now[1] == last[1]
            and now[0].get("evalsha") == last[0].get("evalsha")
        ):
            return now
        last = now
        time.sleep(0.1)
    raise BenchError("Tollgate kept talking to Redis after the load stopped")


def _redis_figures(
    before: dict[str, int],
    after: dict[str, int],
    served: int,
    cpu_s: float,
    requests: int,
    round_trips: float | None,
) -> dict[str, Any]:
    calls = {k: v - before.get(k, 0) for k, v in after.items()}
    calls = {k: v for k, v in calls.items() if v and k != "info"}
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    return {
        "served": served,
        # From MONITOR before the timed runs (round_trips()): commandstats cannot tell a command
        # a client sent from one a script ran, and MONITOR would slow Redis down in a timed run.
        "round_trips_per_request": round_trips,
        # Exactly 2 (admit, settle); commandstats also counts what the scripts run (`commands`).
        "script_calls_per_request": round(scripts / served, 3) if served else None,
        "cpu_us_per_request": round(cpu_s * 1e6 / requests, 1),
        "commands": calls,
    }


def round_trips(target: Target, traffic: str, redis_url: str) -> dict[str, Any]:
    """What Tollgate sends Redis for TRIP_REQUESTS requests, from MONITOR.

    MONITOR shows every command a client sends with its address (`[0 127.0.0.1:52144]`) and
    every command a script runs as `[0 lua]`: each client command is one round trip, however
    many commands its script runs. The window ends at a marker this process sends once every
    request has been answered and settled.
    """
    assert target.metrics_url is not None
    marker = f"tollgate-bench-end-{uuid.uuid4().hex}"
    sent: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    ended = threading.Event()
    watcher = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    own = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10)
    served_before = _served(target.metrics_url)
    try:
        with watcher.monitor() as monitor:

            def read() -> None:
                for entry in monitor.listen():
                    if marker in entry["command"]:
                        ended.set()
                        return
                    name = entry["command"].split(" ", 1)[0].strip('"').lower()
                    (inside if entry["client_type"] == "lua" else sent)[name] += 1

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            for _ in range(TRIP_REQUESTS):
                status, _ = _post(target, traffic)
                if status != 200:
                    raise BenchError(f"{target.name} answered {traffic} with {status}")
            settled = TRIP_REQUESTS + served_before
            if not _until_served(target.metrics_url, settled):
                raise BenchError(f"{target.name}: {TRIP_REQUESTS} requests never all settled")
            own.echo(marker)
            reader.join(timeout=30)
            if not ended.is_set():
                raise BenchError("MONITOR never showed the end marker")
    finally:
        own.close()
        watcher.close()
    trips = sum(sent.values())
    return {
        "requests": TRIP_REQUESTS, "round_trips": trips,
        "round_trips_per_request": round(trips / TRIP_REQUESTS, 3),
        "sent": dict(sent), "run_by_scripts": dict(inside),
    }  # fmt: skip


def _until_served(metrics_url: str, count: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _served(metrics_url) >= count:
            return True
        time.sleep(0.05)
    return False


def measure(
    target: Target,
    traffic: str,
    connections: int,
    *,
    duration_s: int,
    bodies: dict[str, Path],
    redis_client: redis.Redis,
    trips: dict[str, dict[str, Any]],
) -> tuple[Load, dict[str, Any]]:
    """One wrk run against one target, with the CPU, memory and Redis work it caused."""
    pids = procfs.tree(target.roots[traffic])
    if target.metrics_url:
        served_before = _served(target.metrics_url)
        counts_before = _redis_counts(redis_client)
        redis_cpu_before = _redis_cpu_s(redis_client)
    busy_before, total_before = procfs.machine_busy_s()
    cpu_before = procfs.cpu_s(pids)
    load = run_wrk(
        target.urls[traffic],
        body_file=bodies[traffic],
        authorization=target.authorization,
        stream_header=target.stream_header if traffic == "stream" else None,
        connections=connections,
        duration_s=duration_s,
    )
    cpu_s = procfs.cpu_s(pids) - cpu_before
    busy_after, total_after = procfs.machine_busy_s()
    memory = procfs.memory(target.roots[traffic])
    figures: dict[str, Any] = {
        "proxy_cpu_us_per_request": round(cpu_s * 1e6 / load.requests, 1),
        "wrk_cpu_percent": round(100 * load.wrk_cpu_s / load.duration_s, 1),
        "machine_busy_percent": round(
            100 * (busy_after - busy_before) / max(total_after - total_before, 1e-9), 1
        ),
        "rss_per_worker_mib": round(
            sum(memory.worker_rss_bytes) / len(memory.worker_rss_bytes) / 2**20, 1
        ),
        "rss_total_mib": round(memory.total_rss_bytes / 2**20, 1),
        "redis": None,
    }
    if target.metrics_url:
        redis_cpu_s = _redis_cpu_s(redis_client) - redis_cpu_before
        counts_after, served_after = _quiet(redis_client, target.metrics_url)
        figures["redis"] = _redis_figures(
            counts_before, counts_after, served_after - served_before, redis_cpu_s, load.requests,
            trips[target.name][traffic]["round_trips_per_request"] if target.name in trips
            else None,
        )  # fmt: skip
    return load, figures


def _targets(
    stack: ExitStack, tmp: Path, options: argparse.Namespace, upstream: Nginx, rs: RedisServer
) -> list[Target]:
    """The proxies under test, started and registered on `stack` to be stopped."""
    targets: list[Target] = []
    key = ""
    for workers in (1,) if options.smoke else (1, 2):
        directory = tmp / f"tollgate-{workers}w"
        server = stack.enter_context(
            _tollgate(directory, upstream_url=upstream.url + "/v1", redis_url=rs.url,
                      workers=workers)
        )  # fmt: skip
        assert server.process is not None
        if not key:
            with Admin(server.url) as admin:
                key = admin.create_key(name="bench", **UNLIMITED_KEY)["key"]
        targets.append(Target(
            name=f"tollgate-{workers}w", urls=_urls(server.url + "/v1"),
            roots=dict.fromkeys(TRAFFIC, server.process.pid), authorization=f"Bearer {key}",
            stream_header=STREAM_HEADER, exact=True, metrics_url=server.url + "/metrics",
        ))  # fmt: skip
    if not options.smoke:
        proxy = stack.enter_context(nginx_server(tmp / "nginx", upstream_port=upstream.port))
        targets.append(Target(
            name="nginx", urls=_urls(proxy.url + "/v1"), roots=dict.fromkeys(TRAFFIC, proxy.pid),
            authorization=f"Bearer {key}", stream_header=STREAM_HEADER, exact=True,
        ))  # fmt: skip
    if options.litellm:
        urls, roots = {}, {}
        for traffic in CHAT_TRAFFIC:
            prefix = STREAM_PATH_PREFIX if traffic == "stream" else ""
            server = stack.enter_context(
                litellm.litellm_server(tmp / f"litellm-{traffic}",
                                       api_base=f"{upstream.url}{prefix}/v1")
            )  # fmt: skip
            assert server.process is not None
            urls[traffic] = server.url + "/v1/chat/completions"
            roots[traffic] = server.process.pid
        targets.append(Target(
            name="litellm", urls=urls, roots=roots,
            authorization=f"Bearer {litellm.MASTER_KEY}", stream_header=None, exact=False,
        ))  # fmt: skip
    return targets


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Start everything, check every target, run the rounds; returns the report."""
    started = time.monotonic()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tollgate-bench-")))
        upstream = stack.enter_context(nginx_server(tmp / "upstream"))
        rs = stack.enter_context(redis_server())
        redis_client = redis.Redis.from_url(rs.url, decode_responses=True)
        stack.callback(redis_client.close)
        targets = _targets(stack, tmp, options, upstream, rs)
        targets.append(Target(
            name="direct", urls=_urls(upstream.url + "/v1"),
            roots=dict.fromkeys(TRAFFIC, upstream.pid), authorization=targets[0].authorization,
            stream_header=STREAM_HEADER, exact=True,
        ))  # fmt: skip
        checks = {t.name: check(t) for t in targets}
        trips = {
            t.name: {traffic: round_trips(t, traffic, rs.url) for traffic in t.urls}
            for t in targets if t.metrics_url
        }  # fmt: skip
        bodies = {}
        for traffic in TRAFFIC:
            bodies[traffic] = tmp / f"body-{traffic}.json"
            bodies[traffic].write_bytes(request_body(traffic))
        for target in targets:  # pools filled, scripts cached, first-call paths taken
            for traffic in target.urls:
                run_wrk(
                    target.urls[traffic], body_file=bodies[traffic],
                    authorization=target.authorization,
                    stream_header=target.stream_header if traffic == "stream" else None,
                    connections=max(CONNECTIONS), duration_s=WARMUP_S, warmup=True,
                )  # fmt: skip
        runs: list[dict[str, Any]] = []
        for round_ in range(options.rounds):
            for traffic in TRAFFIC:
                for connections in CONNECTIONS:
                    for target in targets:  # alternating, so drift hits every target alike
                        if traffic not in target.urls:
                            continue
                        load, figures = measure(
                            target, traffic, connections, duration_s=options.duration,
                            bodies=bodies, redis_client=redis_client, trips=trips,
                        )  # fmt: skip
                        runs.append(report.run_record(
                            round_, target.name, traffic, connections, load, figures
                        ))  # fmt: skip
                        print(report.progress(runs[-1]), file=sys.stderr, flush=True)
        profile = None
        if options.profile:
            tollgate = targets[0]
            profile = pyspy.profile(
                tollgate.roots["json"], seconds=options.profile, out=options.profile_out,
                binary=options.py_spy,
                load=lambda: run_wrk(
                    tollgate.urls["json"], body_file=bodies["json"],
                    authorization=tollgate.authorization, stream_header=None,
                    connections=options.profile_connections, duration_s=options.profile,
                ),
            )  # fmt: skip
    return {
        "settings": {"rounds": options.rounds, "duration_s": options.duration,
                     "connections": list(CONNECTIONS), "smoke": options.smoke,
                     "targets": [t.name for t in targets]},
        "environment": report.environment(nginx_binary(), wrk_binary()),
        "checks": checks,
        "round_trips": trips,
        "rows": report.rows(runs),
        "stream_cpu": report.stream_cpu(report.rows(runs)),
        "runs": runs,
        "profile": profile,
        "elapsed_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every context manager: all servers stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="A B A B ... rounds (1-10)")
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per wrk run (1-60; 5, smoke 1)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the report here")
    parser.add_argument(
        "--smoke", action="store_true", help="1 round of 1 s runs: Tollgate (1 worker), direct"
    )
    parser.add_argument(
        "--litellm", action="store_true", help=f"add LiteLLM {litellm.VERSION} ({litellm.VENV})"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="SECONDS",
        help="then py-spy Tollgate (1 worker) under a non-streaming run",
    )  # fmt: skip
    parser.add_argument("--py-spy", dest="py_spy", default=None, help="py-spy binary")
    parser.add_argument(
        "--profile-connections",
        dest="profile_connections",
        type=int,
        default=max(CONNECTIONS),
        help="connections during the profile (1 shows the per-request fixed costs)",
    )
    parser.add_argument("--profile-out", dest="profile_out", type=Path, default=DEFAULT_PROFILE)
    options = parser.parse_args(argv)
    if options.smoke:
        options.rounds = 1
    options.duration = options.duration or (1 if options.smoke else 5)
    if not (1 <= options.rounds <= 10 and 1 <= options.duration <= 60):
        parser.error("--rounds must be 1-10 and --duration 1-60")
    options.profile = max(0, min(options.profile, 60))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    result = run(options)
    print(report.table(result["rows"]))
    print()
    print(report.load_table(result["rows"]))
    print()
    print(report.stream_cpu_table(result["stream_cpu"]))
    if result["profile"]:
        print()
        print(pyspy.table(result["profile"], title="Tollgate (1 worker), json, c32"))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nreport written to {options.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
