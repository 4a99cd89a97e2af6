"""Passive health: an upstream that keeps failing is skipped for a while, then probed.

Per process and learnt from real traffic only (no health-check requests of its own): after
`threshold` failed attempts in a row an upstream is open for `cooldown_s`; then one request
probes it (half-open) and its outcome closes or re-opens it. Any success resets the count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Breaker:
    """The health of one upstream in this process."""

    __slots__ = ("failures", "gauge", "open_until", "probing")

    def __init__(self, gauge: Any) -> None:
        self.failures = 0  # failed attempts in a row
        self.open_until = 0.0  # monotonic time; 0 while closed
        self.probing = False  # a half-open probe is under way
        self.gauge = gauge
        gauge.set(1)

    def available(self, now: float) -> bool:
        """Closed, or open with its cool-down over and no probe under way yet."""
        return self.open_until == 0.0 or (now >= self.open_until and not self.probing)


class Health:
    """Every upstream's breaker; `tollgate_upstream_healthy{upstream}` follows each."""

    def __init__(
        self,
        names: list[str],
        gauge: Any,
        *,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.breakers = {name: Breaker(gauge.labels(name)) for name in names}
        self.open: set[str] = set()  # those not closed: while empty, every upstream is usable

    def usable(self, names: list[str]) -> list[str]:
        """Those not skipped now; never empty when `names` is not (a request is never
        refused by the health state alone: then the first is tried anyway)."""
        if not self.open:
            return names
        now = self.clock()
        usable = [n for n in names if self.breakers[n].available(now)]
        return usable or names[:1]

    def attempting(self, name: str, *, last_resort: bool = False) -> bool | None:
        """An attempt may start: True when it is the half-open probe, False for an ordinary
        one, None to skip it now (it was taken out, or another request probes it, since the
        candidates were chosen). A last resort is always tried."""
        breaker = self.breakers[name]
        if breaker.open_until == 0.0:
            return False
        if breaker.available(self.clock()):
            breaker.probing = True
            return True
        return False if last_resort else None

    def succeeded(self, name: str) -> None:
        breaker = self.breakers[name]
        breaker.failures = 0
        if breaker.open_until:
            breaker.open_until = 0.0
            breaker.probing = False
            breaker.gauge.set(1)
            self.open.discard(name)

    def failed(self, name: str) -> None:
        breaker = self.breakers[name]
        breaker.failures += 1
        if breaker.probing or breaker.failures >= self.threshold:
            breaker.open_until = self.clock() + self.cooldown_s
            breaker.probing = False
            breaker.gauge.set(0)
            self.open.add(name)

    def ended(self, name: str, *, probe: bool) -> None:
        """An attempt ended with neither verdict (the client left): if it was the probe, the
        next request may probe instead."""
        if probe:
            self.breakers[name].probing = False
