"""The ledger: settles finished requests, and keeps what the store cannot take now.

A settlement that cannot reach the store waits in the spool (JSON Lines, a versioned wire form)
and is replayed without duplicates once the store is back; an admission whose reply was lost
is released, uncharged and unrecorded, as soon as the store answers again.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.limits import Limiter
from proxy.metering import COMPACT_JSON
from proxy.metrics import Metrics
from proxy.settlement import Settlement, record
from proxy.spool import Spool
from proxy.store import StoreDown

log = logging.getLogger("tollgate")
REPLAY_INTERVAL_S = 2.0
MAX_PENDING_RELEASES = 10_000  # lost admissions kept for release while the store is down


class Ledger:
    """Settle or spool; release lost admissions; replay the spool."""

    def __init__(self, limiter: Limiter, spool: Spool, metrics: Metrics) -> None:
        self.limiter = limiter
        self.spool = spool
        self.metrics = metrics
        self.pending_releases: dict[str, str] = {}  # request id -> key id
        self._overflow_logged = False

    async def settle(self, settlement: Settlement) -> None:
        """Settle one finished request; whatever keeps the store from taking it, spool it."""
        try:
            settled = await record(self.limiter, settlement)
        except StoreDown as exc:
            self.metrics.store_errors.inc()
            log.warning(
                "store unreachable while settling %s: spooled (%s)", settlement.request_id, exc
            )
        except Exception:  # whatever else fails, the record must not be lost
            self.metrics.store_errors.inc()
            log.exception("settling %s failed: spooled", settlement.request_id)
        else:
            if settled.budget_micros:
                self.metrics.budget_used(
                    settled.key_name, settled.budget_spent_micros / settled.budget_micros
                )
            return
        await asyncio.to_thread(self.spool.append, settlement.to_json())
        self.metrics.spooled.inc()  # the replay loop sets the exact count every round

    async def release(self, key_id: str, request_id: str) -> None:
        """Undo an admission whose request never reached the upstream: now, or once the
        store answers again."""
        try:
            await self.limiter.release(key_id, request_id)
        except StoreDown:
            self.metrics.store_errors.inc()
            self.release_later(key_id, request_id)

    def release_later(self, key_id: str, request_id: str) -> None:
        """Undo, once the store answers, an admission whose reply was lost (it may have run;
        nothing went upstream): the replay loop releases it, uncharged and unrecorded."""
        if len(self.pending_releases) < MAX_PENDING_RELEASES:
            self.pending_releases[request_id] = key_id
        elif not self._overflow_logged:  # the sweeper settles the rest after their leases
            self._overflow_logged = True
            log.warning("more than %d lost admissions to release", MAX_PENDING_RELEASES)

    async def retry_releases(self) -> int:
        """Release what waits; returns how many calls landed."""
        landed = 0
        for request_id, key_id in list(self.pending_releases.items()):
            try:
                await self.limiter.release(key_id, request_id)
            except StoreDown:
                return landed
            del self.pending_releases[request_id]
            landed += 1
        self._overflow_logged = False
        return landed

    async def replay(self) -> int:
        """Send spooled settlements to the store; returns how many landed."""
        landed = 0
        for path in self.spool.files():
            claimed = self.spool.claim(path)
            if claimed is None:
                continue
            entries = self.spool.read(claimed)
            for index, entry in enumerate(entries):
                try:
                    await record(self.limiter, Settlement.from_json(entry))
                except Exception as exc:
                    if not isinstance(exc, StoreDown):
                        log.exception("replaying %s failed; kept for the next round", entry)
                    # Put back what did not land; the next round tries again.
                    for rest in entries[index:]:
                        self.spool.append(COMPACT_JSON.encode(rest))
                    claimed.unlink()
                    return landed
                landed += 1
            claimed.unlink()
        return landed

    async def replay_forever(self) -> None:
        """Every few seconds: lost admissions released, the spool replayed, the gauge set."""
        while True:
            await asyncio.sleep(REPLAY_INTERVAL_S)
            try:
                if self.pending_releases:
                    await self.retry_releases()
                if self.spool.files():
                    await self.replay()
            except Exception:  # a replay round must never kill the loop
                log.exception("spool replay failed; retrying")
            self.metrics.spooled.set(self.spool.pending())
