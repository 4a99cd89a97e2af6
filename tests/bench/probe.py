"""What the soak run watches while it loads Tollgate: its process tree in /proc (RSS, sockets),
its /metrics (in-flight gauges, answers by status) and Redis (clients, leases, reservations,
usage records), sampled at a fixed period during each phase.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

import httpx
import redis

from proxy import store
from tests.bench import procfs, sockets
from tests.bench.traffic import Tally

SAMPLE_EVERY_S = 5.0
_STATUS = re.compile(r'status="(\d+)"')


@dataclass(frozen=True, slots=True)
class Probe:
    root: int  # Tollgate's pid: its whole tree is measured
    port: int  # where Tollgate listens
    upstream_port: int
    redis_port: int
    metrics_url: str
    redis: redis.Redis

    def sockets(self) -> dict[str, int]:
        peers = {"upstream": self.upstream_port, "redis": self.redis_port}
        return sockets.census(self.root, listen_port=self.port, peers=peers)

    def metrics(self) -> tuple[dict[str, int], dict[str, int]]:
        """The in-flight gauges, and the requests answered so far by status.

        A new connection each time: a kept-alive one would count among Tollgate's sockets.
        """
        text = httpx.get(self.metrics_url, timeout=10, trust_env=False).text
        gauges = {"inflight": 0, "active_streams": 0}
        statuses: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "tollgate_inflight_requests":
                gauges["inflight"] = round(float(value))
            elif name == "tollgate_active_streams":
                gauges["active_streams"] = round(float(value))
            elif name.startswith("tollgate_requests_total{") and (m := _STATUS.search(name)):
                statuses[m.group(1)] = statuses.get(m.group(1), 0) + round(float(value))
        return gauges, statuses

    def drained(self) -> bool:
        """Nothing in flight in Tollgate: every request answered and settled."""
        gauges, _ = self.metrics()
        return gauges["inflight"] == 0 and gauges["active_streams"] == 0

    def store_state(self) -> dict[str, int]:
        """Summed over every key: usage records, in-flight leases and credit reservations."""
        client = self.redis
        state = {"records": 0, "leaked_slots": 0, "reservations": 0, "reserved_micros": 0}
        for key_id in sorted(cast("set[str]", client.smembers(store.KEY_INDEX))):
            pipe = client.pipeline(transaction=False)
            pipe.xlen(store.usage_key(key_id))
            pipe.zcard(store.inflight_key(key_id))
            pipe.hlen(store.reserved_key(key_id))
            pipe.hget(store.record_key(key_id), "reserved")
            counts: list[Any] = pipe.execute()
            for name, count in zip(state, counts, strict=True):
                state[name] += int(count or 0)
        return state

    def sample(self, phase: str, started: float, tally: Tally | None) -> dict[str, Any]:
        """One sample; `t_s` counts from `started` (time.monotonic())."""
        memory = procfs.memory(self.root)
        socket_counts = self.sockets()
        gauges, _ = self.metrics()
        clients = int(cast("dict[str, Any]", self.redis.info("clients"))["connected_clients"])
        return {
            "phase": phase, "t_s": round(time.monotonic() - started, 1),
            "rss_mib": [round(b / 2**20, 1) for b in memory.worker_rss_bytes],  # per worker
            "sockets": socket_counts, "redis_clients": clients, **gauges,
            "open_streams": tally.open_streams if tally else 0,
            "completed": tally.completed if tally else 0,
            "errors": tally.error_count if tally else 0,
        }  # fmt: skip


async def sampled(
    probe: Probe,
    phase: str,
    tally: Tally,
    samples: list[dict[str, Any]],
    load: Coroutine[Any, Any, None],
    *,
    bound_s: float,
) -> None:
    """Run one phase's load, sampling every SAMPLE_EVERY_S (at most `bound_s` long)."""
    started = time.monotonic()

    async def sampling() -> None:
        for _ in range(int(bound_s / SAMPLE_EVERY_S) + 2):  # bounded: the phase's length
            samples.append(await asyncio.to_thread(probe.sample, phase, started, tally))
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.ensure_future(sampling())
    try:
        await load
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
