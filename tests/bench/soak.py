"""Endurance run: Tollgate holding 1,000 slow streams, then mixed load at 70 % of its measured
maximum; afterwards nothing may be left behind (concurrency slots, credit reservations, sockets,
memory growth) and every request that reached the upstream has exactly one usage record.

A real redis-server, nginx as the mock upstream (fast answers, and slow SSE streams of 20 chunks
over ~30 s), `tollgate serve` (1 worker, every feature on), the load from asyncio/aiohttp in this
process. Loopback only; every phase and wait is bounded; every process it starts is stopped on
exit, error, SIGTERM or Ctrl-C. Exits 1 when a check fails.
Run: .venv/bin/python -m tests.bench.soak [--streams 1000] [--phase1 180] [--phase2 600] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.admin_client import Admin
from tests.bench import procfs, report
from tests.bench.http import CHAT_TRAFFIC, UNLIMITED_KEY, Target, check, request_body
from tests.bench.load import Load, run_wrk, wrk_binary
from tests.bench.nginx import (
    STREAM_HEADER,
    Nginx,
    completion_body,
    nginx_binary,
    nginx_server,
    stream_events,
)
from tests.bench.probe import SAMPLE_EVERY_S, Probe, sampled
from tests.bench.traffic import Request, Tally, hold_streams, offer_mixed
from tests.bench.verdicts import RSS_GROWTH_LIMIT, SOCKET_SLACK, checks, kept, summary
from tests.servers import REPO, ProxyServer, proxy_server, redis_server, tollgate_env

DEFAULT_JSON = REPO / "tests" / "bench" / "results" / "soak.json"
SLOW_HEADER = "X-Bench-Slow"  # its value: the bytes per second nginx sends the stream at
LOAD_FRACTION = 0.7  # phase 2 offers this share of the maximum measured right before it
MIX = ("json", "json", "json", "json", "stream")  # 80 % non-streaming, 20 % fast streams
MAX_OUTSTANDING = 1000  # phase 2 requests in flight at most; further arrivals are dropped
WARM_S = 60.0  # RSS growth is measured from this far into phase 2 (half of it when shorter)
DRAIN_S = 60.0  # for Tollgate's in-flight gauges to reach 0 once the load stopped
SOCKETS_SETTLE_S = 30.0  # upstream keep-alive connections close after 5 s idle
_NGINX_VARIABLE = "$http_" + SLOW_HEADER.lower().replace("-", "_")
_STREAM_LOCATION = "        location = /_stream {\n            internal;\n"
_SLOW_RULE = f"            if ({_NGINX_VARIABLE}) {{ set $limit_rate {_NGINX_VARIABLE}; }}\n"


class SoakError(RuntimeError):
    """The setup did not behave as the run needs; no figure would mean anything."""


def _until(check: Callable[[], bool], *, timeout_s: float) -> bool:
    """Poll `check` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _slow_route_works(upstream: Nginx) -> bool:
    """A slow request's first read brings only part of the body: the rate applies."""
    headers = {STREAM_HEADER: "1", SLOW_HEADER: "100"}
    url = upstream.url + "/v1/chat/completions"
    try:
        with httpx.stream("POST", url, headers=headers, content=b"{}", timeout=5) as answer:
            first = next(answer.iter_raw())
    except (httpx.HTTPError, StopIteration):
        return False
    return answer.status_code == 200 and len(first) < len(b"".join(stream_events()))


@contextmanager
def _upstream(directory: Path) -> Iterator[Nginx]:
    """nginx.upstream_config's mock, reloaded with one rule more: a stream request carrying
    X-Bench-Slow: <bytes/s> gets the same SSE body at that rate (nginx's $limit_rate)."""
    with nginx_server(directory) as upstream:
        conf = directory / "nginx.conf"
        text = conf.read_text(encoding="utf-8")
        if text.count(_STREAM_LOCATION) != 1:
            raise SoakError(f"nginx.upstream_config changed: no single {_STREAM_LOCATION!r}")
        conf.write_text(text.replace(_STREAM_LOCATION, _STREAM_LOCATION + _SLOW_RULE), "utf-8")
        os.kill(upstream.pid, signal.SIGHUP)  # reload: same port, new workers
        if not _until(lambda: _slow_route_works(upstream), timeout_s=15):
            raise SoakError("nginx did not pick up the slow-stream rule after a reload")
        yield upstream


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_phase(
    probe: Probe, name: str, load: Callable[[Tally], Coroutine[Any, Any, None]], *, bound_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One phase: its load, sampled; a bounded drain; one more sample. Its figures and samples."""
    store_before = probe.store_state()
    _, statuses_before = probe.metrics()
    tally, samples = Tally(), list[dict[str, Any]]()
    pids = procfs.tree(probe.root)
    cpu_before, self_before, started = procfs.cpu_s(pids), _self_cpu_s(), time.monotonic()
    busy_before, total_before = procfs.machine_busy_s()
    asyncio.run(sampled(probe, name, tally, samples, load(tally), bound_s=bound_s))
    seconds = time.monotonic() - started
    cpu_s, self_s = procfs.cpu_s(pids) - cpu_before, _self_cpu_s() - self_before
    busy_after, total_after = procfs.machine_busy_s()
    drained = _until(probe.drained, timeout_s=DRAIN_S)
    after = {**probe.sample(name, started, tally), "after_drain": True}
    samples.append(after)
    _, statuses = probe.metrics()
    store_after = probe.store_state()
    rss = [max(s["rss_mib"]) for s in samples]
    done = tally.completed + tally.aborted
    print(f"{name}: {tally.completed} completed, {tally.aborted} cut, {tally.error_count} errors "
          f"in {seconds:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "duration_s": round(seconds, 1),
        "sent": tally.sent, "completed": tally.completed, "aborted": tally.aborted,
        "requests_per_s": round(done / seconds, 1), "dropped": tally.dropped,
        "error_count": tally.error_count, "errors": tally.errors,
        "error_samples": tally.error_samples, "received_bytes": tally.received_bytes,
        "latency_ms": {k: tally.latency_ms(k) for k in sorted(tally.latencies_s)},
        "usage_records": store_after["records"] - store_before["records"],
        "answered_by_status": {k: v - statuses_before.get(k, 0) for k, v in statuses.items()
                               if v != statuses_before.get(k, 0)},
        "rss_mib": {"start": rss[0], "peak": max(rss), "end": rss[-1]},
        "sockets_peak": {k: max(s["sockets"][k] for s in samples) for k in after["sockets"]},
        "sockets_end": after["sockets"],
        "redis_clients_peak": max(s["redis_clients"] for s in samples),
        "redis_clients_end": after["redis_clients"],
        "inflight_peak": max(s["inflight"] for s in samples),
        "active_streams_peak": max(s["active_streams"] for s in samples),
        "open_streams_peak": max(s["open_streams"] for s in samples),
        "drained": drained, "store_after_drain": store_after,
        "tollgate_cpu_percent": round(100 * cpu_s / seconds, 1),
        "generator_cpu_percent": round(100 * self_s / seconds, 1),
        # Of all cores together: well above Tollgate + generator + Redis + nginx means someone
        # else was running too.
        "machine_busy_percent": round(
            100 * (busy_after - busy_before) / max(total_after - total_before, 1e-9), 1),
    }, samples  # fmt: skip


def _stream_seconds(phase1_s: float) -> float:
    """~30 s per slow stream; shorter phases get shorter streams, so some of them end."""
    return max(2.0, min(30.0, phase1_s / 4))


def _warm_sample(samples: list[dict[str, Any]], phase2_s: float) -> dict[str, Any] | None:
    """Phase 2's sample nearest WARM_S into it (half the phase when shorter than 2 x WARM_S)."""
    at = WARM_S if phase2_s >= 2 * WARM_S else phase2_s / 2
    return min(samples, key=lambda s: abs(s["t_s"] - at)) if samples else None


def _raise_nofile(needed: int) -> int:
    """Raise this process's soft descriptor limit (inherited by every server it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = needed if hard == resource.RLIM_INFINITY else hard
    if soft < needed:
        soft = min(ceiling, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        raise SoakError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors "
                        "this run needs: raise it (ulimit -Hn) or lower --streams")  # fmt: skip
    return soft


def _requests(url: str, key: str, slow_rate: int) -> dict[str, Request]:
    base = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    stream_bytes = b"".join(stream_events())
    done = b"data: [DONE]\n\n"
    return {
        "json": Request(url=url, body=request_body("json"), headers=base,
                        answer_bytes=len(completion_body()), ending=b"}"),
        "stream": Request(url=url, body=request_body("stream"),
                          headers={**base, STREAM_HEADER: "1"}, answer_bytes=len(stream_bytes),
                          ending=done),
        "slow": Request(url=url, body=request_body("stream"),
                        headers={**base, STREAM_HEADER: "1", SLOW_HEADER: str(slow_rate)},
                        answer_bytes=len(stream_bytes), ending=done),
    }  # fmt: skip


def _tollgate(stack: ExitStack, tmp: Path, upstream: Nginx, redis_url: str) -> ProxyServer:
    env = tollgate_env(
        redis_url=redis_url,
        upstream_url=upstream.url + "/v1",
        spool_dir=tmp / "spool",
        upstream_api_key="sk-upstream-soak",
        TOLLGATE_SHUTDOWN_TIMEOUT="5",
        TOLLGATE_FORWARD_HEADERS="x-bench-stream,x-bench-slow",  # the mock upstream's switches
    )
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]
    return stack.enter_context(proxy_server(env=env, args=args))


def _maximum(url: str, key: str, directory: Path, probe: Probe) -> tuple[float, Load]:
    """Tollgate's maximum for phase 2's mix right now: wrk, 5 s, 32 connections, for each kind
    of request, combined by their shares (a harmonic mean); also the non-streaming run."""
    loads: dict[str, Load] = {}
    for traffic in ("json", "stream"):
        body = directory / f"body-{traffic}.json"
        body.write_bytes(request_body(traffic))
        header = STREAM_HEADER if traffic == "stream" else None

        def wrk(seconds: int, body: Path = body, header: str | None = header) -> Load:
            return run_wrk(url, body_file=body, authorization=f"Bearer {key}",
                           stream_header=header, connections=32, duration_s=seconds,
                           warmup=seconds < 5)  # fmt: skip

        wrk(1)  # this path's first calls, outside the measured run
        loads[traffic] = wrk(5)
        if not _until(probe.drained, timeout_s=DRAIN_S):
            raise SoakError("requests cut off by wrk's stop never settled")
    mix = 1 / sum(1 / loads[kind].requests_per_s for kind in MIX) * len(MIX)
    return mix, loads["json"]


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Start everything, run both phases, drain, check; returns the report."""
    started = time.monotonic()
    nofile = _raise_nofile(3 * options.streams + MAX_OUTSTANDING + 512)
    stream_s = _stream_seconds(options.phase1)
    slow_rate = math.ceil(len(b"".join(stream_events())) / stream_s)
    ramp_s = min(10.0, options.phase1 / 4)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tollgate-soak-")))
        upstream = stack.enter_context(_upstream(tmp / "upstream"))
        rs = stack.enter_context(redis_server())
        client = redis.Redis.from_url(rs.url, decode_responses=True)
        stack.callback(client.close)
        server = _tollgate(stack, tmp, upstream, rs.url)
        assert server.process is not None
        with Admin(server.url, trust_env=False) as admin:  # priced model: credits are reserved
            key = admin.create_key(name="soak", **UNLIMITED_KEY)["key"]
        url = server.url + "/v1/chat/completions"
        probe = Probe(root=server.process.pid, port=server.port, upstream_port=upstream.port,
                      redis_port=rs.port, metrics_url=server.url + "/metrics",
                      redis=client)  # fmt: skip
        check(Target(
            name="tollgate", urls=dict.fromkeys(CHAT_TRAFFIC, url),  # the soak drives chat
            roots=dict.fromkeys(CHAT_TRAFFIC, probe.root), authorization=f"Bearer {key}",
            stream_header=STREAM_HEADER, exact=True,
        ))  # fmt: skip
        requests = _requests(url, key, slow_rate)
        # Idle: the check's upstream connections have expired; nothing is in flight.
        _until(lambda: probe.sockets()["upstream"] == 0, timeout_s=SOCKETS_SETTLE_S)
        idle = probe.sample("idle", started, None)

        phase1, samples1 = _run_phase(
            probe, "phase1",
            lambda tally: hold_streams(requests["slow"], streams=options.streams,
                                       duration_s=options.phase1, ramp_s=ramp_s, tally=tally),
            bound_s=options.phase1 + 40,
        )  # fmt: skip
        mix_max, most = _maximum(url, key, tmp, probe)
        rate = options.load_fraction * mix_max
        print(f"maximum {mix_max:.0f} req/s for the mix (wrk, 32 connections; non-streaming "
              f"alone {most.requests_per_s:.0f}); offering {rate:.0f} req/s",
              file=sys.stderr, flush=True)  # fmt: skip
        phase2, samples2 = _run_phase(
            probe, "phase2",
            lambda tally: offer_mixed(requests, list(MIX), rate_per_s=rate,
                                      duration_s=options.phase2, outstanding=MAX_OUTSTANDING,
                                      tally=tally),
            bound_s=options.phase2 + 40,
        )  # fmt: skip
        drained_at = time.monotonic()
        _until(lambda: kept(probe.sockets()) <= kept(idle["sockets"]) + SOCKET_SLACK,
               timeout_s=SOCKETS_SETTLE_S)  # fmt: skip
        end = {**probe.sample("end", started, None),
               "settle_s": round(time.monotonic() - drained_at, 1)}  # fmt: skip
        log_tail = server.output()[-4000:]
    phase1.update(streams=options.streams, slow_stream_s=stream_s, ramp_s=ramp_s)
    phase2.update(
        maximum_requests_per_s=round(mix_max, 1),
        maximum_json_requests_per_s=round(most.requests_per_s, 1),
        maximum_p50_ms=most.p50_ms,
        maximum_p99_ms=most.p99_ms, target_requests_per_s=round(rate, 1),
    )  # fmt: skip
    warm = _warm_sample(samples2[:-1], options.phase2)
    found = checks({"phase1": phase1, "phase2": phase2}, idle=idle, end=end, warm=warm)
    return {
        "settings": {
            "streams": options.streams, "phase1_s": options.phase1, "phase2_s": options.phase2,
            "short": options.short, "slow_stream_s": stream_s, "slow_rate_bytes_per_s": slow_rate,
            "sample_every_s": SAMPLE_EVERY_S, "load_fraction": options.load_fraction,
            "mix": list(MIX), "warm_s": WARM_S, "rss_growth_limit": RSS_GROWTH_LIMIT,
            "socket_slack": SOCKET_SLACK, "rlimit_nofile": nofile, "tollgate_workers": 1,
        },
        "environment": report.environment(nginx_binary(), wrk_binary()),
        "idle": idle, "phase1": phase1, "phase2": phase2, "end": end, "warm": warm,
        "checks": found, "ok": all(c["ok"] for c in found),
        "samples": [idle, *samples1, *samples2, end],
        "tollgate_log_tail": log_tail,
        "elapsed_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every context manager: all servers stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=None, help="slow streams (1000; short 100)")
    parser.add_argument("--phase1", type=float, default=None, help="seconds (180; short 20)")
    parser.add_argument("--phase2", type=float, default=None, help="seconds (600; short 20)")
    parser.add_argument("--short", action="store_true", help="100 streams, 20 s + 20 s")
    parser.add_argument(
        "--load-fraction", type=float, default=LOAD_FRACTION,
        help=f"share of the measured maximum phase 2 offers ({LOAD_FRACTION})",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the report here")
    options = parser.parse_args(argv)
    for name, full, short in (("streams", 1000, 100), ("phase1", 180.0, 20.0),
                              ("phase2", 600.0, 20.0)):  # fmt: skip
        if getattr(options, name) is None:
            setattr(options, name, short if options.short else full)
    if not (1 <= options.streams <= 5000 and 5 <= options.phase1 <= 3600
            and 5 <= options.phase2 <= 3600):  # fmt: skip
        parser.error("--streams must be 1-5000, --phase1 and --phase2 5-3600 seconds")
    # prometheus-client turns multiprocess mode on when the variable merely exists.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    result = run(options)
    print(summary(result))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nreport written to {options.json}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
