"""The Gateway: the parts one process serves with, built once in the app's lifespan.

Handlers reach it through `request.app.state.gateway`; it also settles finished requests,
spooling their usage to disk while the store is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Settings
from proxy.keys import Keyring
from proxy.limits import Limiter
from proxy.metrics import Metrics
from proxy.models import ModelCatalog
from proxy.paths import PassthroughPaths
from proxy.spool import Spool
from proxy.store import Store, StoreDown
from proxy.sweeper import Sweeper
from proxy.upstream import Upstream

log = logging.getLogger("tollgate")
FAIL_OPEN_MEMORY_S = 300.0
REPLAY_INTERVAL_S = 2.0


@dataclass(slots=True)
class Gateway:
    settings: Settings
    store: Store
    upstream: Upstream
    metrics: Metrics
    limiter: Limiter
    keyring: Keyring
    spool: Spool
    sweeper: Sweeper
    passthrough_paths: PassthroughPaths
    models: ModelCatalog
    # key hash -> (key name, monotonic expiry): keys seen lately, for fail-open.
    recent_keys: dict[str, tuple[str, float]] = field(default_factory=dict)
    _fail_open_logged: float = 0.0

    def remember_key(self, key_hash: str, key_name: str) -> None:
        if self.settings.fail_open:
            self.recent_keys[key_hash] = (key_name, time.monotonic() + FAIL_OPEN_MEMORY_S)

    def recent_key_name(self, key_hash: str) -> str | None:
        entry = self.recent_keys.get(key_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        now = time.monotonic()
        if now - self._fail_open_logged > 60:
            self._fail_open_logged = now
            log.warning("store unreachable: admitting known keys without limits (fail-open)")
        return entry[0]

    async def settle(self, settlement: dict[str, Any]) -> None:
        """Settle one finished request; when the store is down, keep it in the spool."""
        try:
            await self.limiter.settle(**settlement)
        except StoreDown as exc:
            self.metrics.store_errors.inc()
            log.warning(
                "store unreachable while settling %s: spooled (%s)", settlement["request_id"], exc
            )
        except Exception:  # whatever else fails, the record must not be lost: spool it too
            self.metrics.store_errors.inc()
            log.exception("settling %s failed: spooled", settlement["request_id"])
        else:
            return
        await asyncio.to_thread(self.spool.append, settlement)
        self.metrics.spooled.inc()  # the replay loop sets the exact count every round

    async def replay_spool(self) -> int:
        """Send spooled settlements to the store; returns how many landed."""
        landed = 0
        for path in self.spool.files():
            claimed = self.spool.claim(path)
            if claimed is None:
                continue
            entries = self.spool.read(claimed)
            for index, entry in enumerate(entries):
                try:
                    await self.limiter.settle(**entry)
                except Exception as exc:
                    if not isinstance(exc, StoreDown):
                        log.exception("replaying %s failed; kept for the next round", entry)
                    # Put back what did not land; the next round tries again.
                    for rest in entries[index:]:
                        self.spool.append(rest)
                    claimed.unlink()
                    return landed
                landed += 1
            claimed.unlink()
        return landed

    async def replay_forever(self) -> None:
        """Replay the spool every few seconds; the gauge shows what still waits in it."""
        while True:
            await asyncio.sleep(REPLAY_INTERVAL_S)
            if self.spool.files():
                try:
                    await self.replay_spool()
                except Exception:  # a replay round must never kill the loop
                    log.exception("spool replay failed; retrying")
                self.metrics.spooled.set(self.spool.pending())

    async def sweep_forever(self) -> None:
        """Sweep requests of dead proxies, at about half a lease apart."""
        while True:
            await asyncio.sleep(self.sweeper.every_ms / 1000)
            try:
                await self.sweeper.sweep()
            except StoreDown:
                self.metrics.store_errors.inc()
            except Exception:  # a sweep round must never kill the loop
                log.exception("sweep failed; retrying")

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.store.aclose()
