"""Benchmark: what admission + settlement cost per request against a real local redis-server.

Reports Redis round trips per request (from INFO commandstats deltas), the p50/p99 latency the
limiter adds for admission and for settlement, and Redis CPU per request. Loopback only,
bounded by --requests. Run: .venv/bin/python -m tests.bench.limiter [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from typing import Any

import redis.asyncio as aioredis

from proxy.keys import Keyring, parse_key
from proxy.limits import Limiter
from proxy.redis_mux import RedisMux
from proxy.store import REDIS_TIMEOUT_S, Store
from tests.bench.http import script_commands
from tests.servers import redis_server

_IN_SCRIPTS = script_commands()  # INFO commandstats counts the commands scripts run, too


def _commandstats(info: dict[str, Any]) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()
            if k.startswith("cmdstat_")}  # fmt: skip


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, *, requests: int, concurrency: int, client_path: str) -> dict[str, Any]:
    """client_path: "mux" (the proxy's shared connection) or "redis-py" (a pool)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    mux = RedisMux(url, timeout_s=REDIS_TIMEOUT_S, connect_timeout_s=REDIS_TIMEOUT_S)
    store = Store(client, mux=mux if client_path == "mux" else None)
    record = await Keyring(store).create(
        name="bench",
        limits={"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6},
        credits_micros=10**15,
        allowed_models=None,
        metadata={},
    )
    presented = parse_key(record["key"])
    assert presented is not None
    limiter = Limiter(store, lease_ms=240_000)
    admit_ms: list[float] = []
    settle_ms: list[float] = []
    record_json = json.dumps({"request_id": "x", "model": "gpt-4o-mini", "prompt_tokens": 12})

    async def one() -> None:
        request_id = secrets.token_hex(8)
        start = time.perf_counter()
        decision = await limiter.admit(
            presented, request_id=request_id, model="gpt-4o-mini", token_estimate=1036,
            cost_micros=700,
        )  # fmt: skip
        admitted = time.perf_counter()
        assert decision.admitted, decision
        await limiter.settle(
            presented.key_id, request_id=request_id, day="2026-11-22", model="gpt-4o-mini",
            prompt_tokens=12, completion_tokens=18, cost_micros=13, record_json=record_json,
        )  # fmt: skip
        admit_ms.append((admitted - start) * 1000)
        settle_ms.append((time.perf_counter() - admitted) * 1000)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await worker(20)  # scripts loaded, connections open
    admit_ms.clear()
    settle_ms.clear()
    before_cmds = _commandstats(await client.info("commandstats"))
    before_cpu = await client.info("cpu")
    per_worker = requests // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after_cmds = _commandstats(await client.info("commandstats"))
    after_cpu = await client.info("cpu")
    done = per_worker * concurrency
    calls = {k: after_cmds[k] - before_cmds.get(k, 0) for k in after_cmds}
    calls = {k: v for k, v in calls.items() if v and k not in ("info",)}
    # commandstats also counts the commands a script runs; a round trip is a script call or a
    # command no script issues.
    round_trips = sum(
        v for k, v in calls.items() if k in ("evalsha", "eval") or k not in _IN_SCRIPTS
    )
    redis_cpu_s = sum(
        float(after_cpu[f]) - float(before_cpu[f]) for f in ("used_cpu_sys", "used_cpu_user")
    )
    await store.aclose()
    return {
        "client": client_path,
        "requests": done,
        "concurrency": concurrency,
        "round_trips_per_request": round(round_trips / done, 3),
        "script_commands_per_request": round((sum(calls.values()) - round_trips) / done, 2),
        "commands": calls,
        "admit_p50_ms": round(statistics.median(admit_ms), 3),
        "admit_p99_ms": round(_percentile(admit_ms, 0.99), 3),
        "settle_p50_ms": round(statistics.median(settle_ms), 3),
        "settle_p99_ms": round(_percentile(settle_ms, 0.99), 3),
        "redis_cpu_us_per_request": round(redis_cpu_s * 1e6 / done, 1),
        "requests_per_s": round(done / elapsed),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| client | concurrency | requests | round trips/req | commands in scripts/req | "
            "admit p50 / p99 ms | settle p50 / p99 ms | Redis CPU µs/req | req/s |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['client']} | {r['concurrency']} | {r['requests']} | "
            f"{r['round_trips_per_request']} | {r['script_commands_per_request']} | "
            f"{r['admit_p50_ms']} / {r['admit_p99_ms']} | {r['settle_p50_ms']} / "
            f"{r['settle_p99_ms']} | {r['redis_cpu_us_per_request']} | {r['requests_per_s']} |"
        )
    return "\n".join(lines)


def run(requests: int) -> list[dict[str, Any]]:
    with redis_server() as server:
        return [
            asyncio.run(measure(server.url, requests=requests, concurrency=c, client_path=path))
            for path in ("mux", "redis-py")
            for c in (1, 32)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(max(64, min(args.requests, 200_000)))
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
