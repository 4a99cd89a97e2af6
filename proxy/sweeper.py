"""The sweeper: requests whose proxy process died before settling still get their record.

Every admitted request leaves an in-flight entry whose lease outlives the upstream deadline.
A lease that ran out means its proxy is gone: the sweeper settles the request as estimated
(prompt estimate, no completion tokens known), which also frees its slot and reservation.
One process sweeps at a time (a lock in Redis); settlement is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os

from proxy import store
from proxy.credits import PriceTable
from proxy.limits import Limiter
from proxy.metering import Usage
from proxy.metrics import Metrics
from proxy.settlement import InFlight, record, settlement
from proxy.store import Store, StoreDown

log = logging.getLogger("tollgate.sweeper")
LOCK_KEY = "tollgate:sweeper:lock"
BATCH = 200
PER_KEY = 100
SWEPT_STATUS = 0  # the proxy ended before the request did; no status reached the client


class Sweeper:
    def __init__(self, store_: Store, limiter: Limiter, prices: PriceTable, *, every_ms: int):
        self.store = store_
        self.limiter = limiter
        self.prices = prices
        self.every_ms = every_ms

    async def sweep_forever(self, metrics: Metrics) -> None:
        """Sweep requests of dead proxies, at about half a lease apart."""
        while True:
            await asyncio.sleep(self.every_ms / 1000)
            try:
                await self.sweep()
            except StoreDown:
                metrics.store_errors.inc()
            except Exception:  # a sweep round must never kill the loop
                log.exception("sweep failed; retrying")

    async def sweep(self) -> int:
        """Settle every request whose lease has run out; returns how many."""
        client = self.store.client
        locked = await self.store.call(
            lambda: client.set(LOCK_KEY, os.getpid(), nx=True, px=self.every_ms)
        )
        if not locked:
            return 0
        seconds, micros = await self.store.call(lambda: client.time())
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        key_ids = sorted(await self.store.call(lambda: client.smembers(store.KEY_INDEX)))
        swept = 0
        for start in range(0, len(key_ids), BATCH):
            batch = key_ids[start : start + BATCH]
            pipe = client.pipeline(transaction=False)
            for key_id in batch:
                pipe.zrangebyscore(store.inflight_key(key_id), "-inf", now_ms, start=0, num=PER_KEY)
            expired_lists: list[list[str]] = await self.store.call(pipe.execute)
            for key_id, expired in zip(batch, expired_lists, strict=True):
                if expired:
                    swept += await self._settle_key(key_id, expired)
        if swept:
            log.warning("swept %d requests whose proxy ended before they did", swept)
        return swept

    async def _settle_key(self, key_id: str, request_ids: list[str]) -> int:
        client = self.store.client
        reservations: list[str | None] = await self.store.call(
            lambda: client.hmget(store.reserved_key(key_id), request_ids)
        )
        name = await self.store.call(lambda: client.hget(store.record_key(key_id), "name"))
        for request_id, reservation in zip(request_ids, reservations, strict=True):
            marker = InFlight.decode(reservation)
            usage = Usage(marker.prompt, 0, "estimated")
            swept = settlement(
                request_id=request_id,
                client_request_id=None,
                ts=marker.ts,
                key_id=key_id,
                key_name=name or "",
                model=marker.model,
                route=marker.route,
                path=marker.path,
                stream=marker.stream,
                status=SWEPT_STATUS,
                usage=usage,
                cost_micros=self.prices.cost_micros(marker.model, usage.prompt_tokens, 0),
                latency_s=None,
                ttft_s=None,
            )
            await record(self.limiter, swept)
        return len(request_ids)
