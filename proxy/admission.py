"""Admission: one store round trip authenticates and admits a request, or refuses it.

Refusals become the HTTP errors of SPEC §3 here, at the edge. While the store is down, keys this
process saw lately are admitted unchecked in fail-open mode; otherwise the answer is 503, and an
admission whose reply was lost is released (it may have run in the store).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from proxy.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    InsufficientCredits,
    ModelNotAllowed,
    ProxyError,
    RateLimited,
    StoreUnavailable,
)
from proxy.keys import PresentedKey, iso_ms
from proxy.ledger import Ledger
from proxy.limits import Decision, Limiter, rate_limit_headers, retry_headers
from proxy.metrics import Metrics
from proxy.settlement import InFlight
from proxy.store import StoreDown

log = logging.getLogger("tollgate")
FAIL_OPEN_MEMORY_S = 300.0
EXPIRED = "API key expired"
_LIMIT_MESSAGES = {
    "requests": "Rate limit reached for requests per minute (limit: {rpm}). Try again in {wait}.",
    "tokens": "Rate limit reached for tokens per minute (limit: {tpm}). Try again in {wait}.",
    "model_requests": "Rate limit reached for requests per minute of model '{model}' "
    "(limit: {rpm}). Try again in {wait}.",
    "model_tokens": "Rate limit reached for tokens per minute of model '{model}' "
    "(limit: {tpm}). Try again in {wait}.",
    "concurrency": "Too many concurrent requests for this key. Try again when one has finished.",
}


@dataclass(slots=True)
class Arrival:
    """What is known of a request before it goes upstream; admission fills in `key_name`.

    (Not frozen: a frozen dataclass sets each field through object.__setattr__.)
    """

    request_id: str
    client_request_id: str | None
    key_id: str
    key_name: str
    route: str
    path: str
    started: float  # time.perf_counter()
    deadline: float  # loop time by which the whole upstream exchange must end
    ts: float  # time.time() at arrival


class Admission:
    """The limiter at the edge: decisions to errors, fail-open memory, lost replies released."""

    def __init__(
        self, limiter: Limiter, ledger: Ledger, metrics: Metrics, *, fail_open: bool
    ) -> None:
        self.limiter = limiter
        self.ledger = ledger
        self.metrics = metrics
        self.fail_open = fail_open
        # key hash -> (key name, monotonic expiry): keys seen lately, for fail-open.
        self.recent_keys: dict[str, tuple[str, float]] = {}
        self._fail_open_logged = 0.0

    async def admit(
        self,
        presented: PresentedKey,
        arrival: Arrival,
        *,
        model: str,
        stream: bool,
        prompt_estimate: int,
        token_estimate: int,
        cost_micros: int | None,
    ) -> Decision:
        """Admit or raise the refusal; fills in the arrival's key name."""
        marker = InFlight(arrival.ts, model, arrival.route, arrival.path, stream, prompt_estimate)
        try:
            decision = await self.limiter.admit(
                presented,
                request_id=arrival.request_id,
                model=model,
                token_estimate=token_estimate,
                cost_micros=cost_micros,
                marker=marker.encode(),
            )
        except StoreDown:
            self.metrics.store_errors.inc()
            name = self._recent_key_name(presented.key_hash) if self.fail_open else None
            if name is None:
                # The admission may have run before its reply was lost; nothing goes upstream.
                self.ledger.release_later(presented.key_id, arrival.request_id)
                unavailable = StoreUnavailable(
                    "The rate-limit store is unreachable; try again shortly"
                )
                self.metrics.answered(arrival.route, model, unavailable.status_code, "")
                raise unavailable from None
            # Admitted unchecked; its settlement also settles an admission that did run.
            self.metrics.fail_open.inc()
            decision = Decision(verdict="ok", key_name=name)
        else:
            if not decision.admitted:
                arrival.key_name = decision.key_name  # named in the access log (none: unknown)
                refusal = self._refusal(decision, model)
                self.metrics.answered(arrival.route, model, refusal.status_code, decision.key_name)
                raise refusal
            if decision.budget_micros:
                self.metrics.budget_used(
                    decision.key_name, decision.budget_spent_micros / decision.budget_micros
                )
            if self.fail_open:
                self.recent_keys[presented.key_hash] = (
                    decision.key_name,
                    time.monotonic() + FAIL_OPEN_MEMORY_S,
                )
        arrival.key_name = decision.key_name
        return decision

    def _recent_key_name(self, key_hash: str) -> str | None:
        entry = self.recent_keys.get(key_hash)
        now = time.monotonic()
        if entry is None or entry[1] < now:
            return None
        if now - self._fail_open_logged > 60:
            self._fail_open_logged = now
            log.warning("store unreachable: admitting known keys without limits (fail-open)")
        return entry[0]

    def _refusal(self, decision: Decision, model: str) -> ProxyError:
        name = decision.key_name
        verdict = decision.verdict
        if verdict in ("unknown_key", "revoked"):
            return AuthenticationFailed()
        if verdict == "expired":
            return AuthenticationFailed(EXPIRED)
        if verdict == "model_not_allowed":
            return ModelNotAllowed(f"This API key is not allowed to use the model '{model}'")
        if verdict == "unpriced":
            return ModelNotAllowed(
                f"The model '{model}' has no price, so keys with a credit balance cannot use it"
            )
        metrics = self.metrics
        if verdict == "credits":
            metrics.credit_rejections.labels(*metrics.keyed(name, "credits")).inc()
            return InsufficientCredits(
                "Insufficient credits: the balance cannot cover this request's maximum cost. "
                "Add credits or lower max_tokens."
            )
        if verdict == "budget":
            metrics.credit_rejections.labels(*metrics.keyed(name, "budget")).inc()
            resets = iso_ms(decision.budget_resets_ms)
            return BudgetExceeded(
                f"Budget exceeded: this API key's budget for the period cannot cover this "
                f"request's maximum cost. It resets at {resets}.",
                headers=retry_headers(decision.retry_after_ms),
            )
        limit = verdict.removeprefix("model_")
        metrics.rate_limited.labels(*metrics.keyed(name, limit)).inc()
        wait = f"{decision.retry_after_ms / 1000:.3g}s"
        message = _LIMIT_MESSAGES[verdict].format(
            rpm=decision.rpm, tpm=decision.tpm, wait=wait, model=model
        )
        headers = {k.decode(): v.decode() for k, v in rate_limit_headers(decision)}
        return RateLimited(message, headers={**headers, **retry_headers(decision.retry_after_ms)})
