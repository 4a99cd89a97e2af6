"""Admission, settlement and release: the decisions of the limits (values, not exceptions).

One script call authenticates and admits (requests, tokens, concurrency, credits); one settles
and records usage; one releases, uncharged, an admission whose reply the store failure lost.
Only the web edge turns a refusal into an HTTP error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from proxy import store
from proxy.keys import PresentedKey
from proxy.store import Store

LEASE_MARGIN_MS = 10_000  # a lease outlives the upstream deadline by this much
RETENTION_MS_PER_DAY = 86_400_000


@dataclass(frozen=True, slots=True)
class Decision:
    """The admission script's answer. Limits the key does not have are None."""

    verdict: str
    key_name: str = ""
    rpm: int | None = None
    requests_remaining: int = 0
    requests_reset_ms: int = 0
    tpm: int | None = None
    tokens_remaining: int = 0
    tokens_reset_ms: int = 0
    retry_after_ms: int = 0
    budget_micros: int | None = None
    budget_spent_micros: int = 0
    budget_resets_ms: int = 0  # end of the budget's period, ms since the epoch

    @property
    def admitted(self) -> bool:
        return self.verdict == "ok"


@dataclass(frozen=True, slots=True)
class Settled:
    """The settlement script's answer: whether it settled now (not before), and the key's
    budget after it (None: the key has none)."""

    settled: bool
    key_name: str = ""
    budget_micros: int | None = None
    budget_spent_micros: int = 0


def _decision(reply: list[object]) -> Decision:
    verdict = str(reply[0])
    if len(reply) < 12:
        return Decision(verdict=verdict, key_name=str(reply[1]) if len(reply) > 1 else "")
    n = [int(str(x)) for x in reply[2:12]]
    return Decision(
        verdict=verdict,
        key_name=str(reply[1]),
        rpm=n[0] if n[0] >= 0 else None,
        requests_remaining=n[1],
        requests_reset_ms=n[2],
        tpm=n[3] if n[3] >= 0 else None,
        tokens_remaining=n[4],
        tokens_reset_ms=n[5],
        retry_after_ms=n[6],
        budget_micros=n[7] if n[7] >= 0 else None,
        budget_spent_micros=n[8],
        budget_resets_ms=n[9],
    )


class Limiter:
    """Runs the admission and settlement scripts against the store."""

    def __init__(self, store: Store, *, lease_ms: int, retention_days: int = 30) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.retention_ms = retention_days * RETENTION_MS_PER_DAY

    async def admit(
        self,
        presented: PresentedKey,
        *,
        request_id: str,
        model: str,
        token_estimate: int,
        cost_micros: int | None,
        marker: str = "{}",
        now_ms: int | None = None,
    ) -> Decision:
        """cost_micros None means the model has no price (refused for keys with a balance)."""
        args: list[str | int] = [
            presented.key_hash,
            request_id,
            "" if now_ms is None else now_ms,
            model,
            token_estimate,
            -1 if cost_micros is None else cost_micros,
            self.lease_ms,
            marker,
        ]
        keys = store.admission_keys(presented.key_id)
        reply = await self.store.run(self.store.admit_script, keys, args)
        return _decision(reply)

    async def settle(
        self,
        key_id: str,
        *,
        request_id: str,
        day: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_micros: int,
        record_json: str,
        request_ms: int | None = None,
    ) -> Settled:
        """Release the request's slot and reservation, charge it, append its usage record.

        `request_ms` is when the request arrived (None: now); a record written much later is
        indexed by it, so usage queries date it by the request, not by the replay."""
        args: list[str | int] = [
            request_id,
            prompt_tokens + completion_tokens,
            cost_micros,
            day,
            model,
            prompt_tokens,
            completion_tokens,
            self.retention_ms,
            record_json,
            int(time.time() * 1000) if request_ms is None else request_ms,
            store.LATE_RECORD_MS,
        ]
        keys = store.settlement_keys(key_id)
        reply = await self.store.run(self.store.settle_script, keys, args)
        if not reply[0]:
            return Settled(settled=False)
        budget = int(reply[2])
        return Settled(
            settled=True,
            key_name=str(reply[1]),
            budget_micros=budget if budget >= 0 else None,
            budget_spent_micros=int(reply[3]),
        )

    async def release(self, key_id: str, request_id: str) -> bool:
        """Undo an admission that never reached the upstream (its reply was lost to a store
        failure): slot, reservation, token estimate and the request's token come back, with no
        charge and no usage record, and a later settlement of the id does nothing.

        Idempotent; an id never admitted, or already settled or released, changes nothing.
        True when an admission was released now. Raises StoreDown when the store is down
        (the caller keeps the release to retry it).
        """
        keys = store.release_keys(key_id)
        reply = await self.store.run(
            self.store.release_script, keys, [request_id, self.retention_ms]
        )
        return bool(reply)


def format_duration(ms: int) -> str:
    """OpenAI's reset format: `250ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`; never shorter than `ms`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    if ms < 60_000:
        seconds, rest = divmod(ms, 1000)
        return f"{seconds}s" if not rest else f"{seconds}.{rest:03d}".rstrip("0") + "s"
    total = math.ceil(ms / 1000)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers plus the IETF RateLimit-Policy / RateLimit fields."""
    headers: list[tuple[bytes, bytes]] = []
    policies: list[str] = []
    states: list[str] = []
    if decision.rpm is not None:
        headers += [
            (b"x-ratelimit-limit-requests", str(decision.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(decision.requests_remaining).encode()),
            (b"x-ratelimit-reset-requests", format_duration(decision.requests_reset_ms).encode()),
        ]
        policies.append(f'"requests";q={decision.rpm};w=60')
        states.append(
            f'"requests";r={decision.requests_remaining};'
            f"t={math.ceil(decision.requests_reset_ms / 1000)}"
        )
    if decision.tpm is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", str(decision.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(decision.tokens_remaining).encode()),
            (b"x-ratelimit-reset-tokens", format_duration(decision.tokens_reset_ms).encode()),
        ]
        policies.append(f'"tokens";q={decision.tpm};w=60;tollgate-unit="tokens"')
        states.append(
            f'"tokens";r={decision.tokens_remaining};t={math.ceil(decision.tokens_reset_ms / 1000)}'
        )
    if policies:
        headers.append((b"ratelimit-policy", ", ".join(policies).encode()))
        headers.append((b"ratelimit", ", ".join(states).encode()))
    return headers


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(max(1, retry_after_ms)),
    }
