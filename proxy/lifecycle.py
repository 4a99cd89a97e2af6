"""One admitted request, from the upstream call to its settlement, as the ASGI response.

The exchange (send, read or relay) runs in a task of its own beside a listener for the client's
disconnect; whichever ends first ends the other. Its one deadline is `asyncio.timeout_at`. The
single `finally` settles every path exactly once: success, upstream error, timeout, client gone,
server shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any, NamedTuple

import httpx
from starlette.types import Receive, Scope, Send

from proxy.access_log import CLIENT_GONE, Entry
from proxy.admission import Arrival
from proxy.config import Settings
from proxy.credits import micros_to_usd
from proxy.errors import (
    InternalError,
    ProxyError,
    StoreUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from proxy.health import Health
from proxy.ledger import Ledger
from proxy.limits import Decision, rate_limit_headers
from proxy.metering import StreamMeter, Usage
from proxy.metrics import Metrics
from proxy.settlement import settlement
from proxy.surfaces.base import Parsed, Surface
from proxy.upstream import Upstream, response_headers

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer ended
# Transport errors raised before a byte of the request was written.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_JSON = (b"content-type", b"application/json")


async def _cancel_on_disconnect(receive: Receive, exchange: asyncio.Future[Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    exchange.cancel()  # the upstream read stops at once; its connection is closed


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Answer(NamedTuple):
    """A whole answer, sent once the request is settled."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Lifecycle:
    """Owns one admitted request until it is settled; Starlette runs it as the response."""

    def __init__(
        self,
        *,
        arrival: Arrival,
        parsed: Parsed,
        surface: Surface,
        decision: Decision,
        candidates: tuple[Upstream, ...],
        health: Health,
        upstream_path: str,
        method: str,
        client_headers: list[tuple[bytes, bytes]],
        query: bytes,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        state: dict[str, Any],
    ) -> None:
        self.arrival = arrival
        self.parsed = parsed
        self.surface = surface
        self.decision = decision
        self.candidates = candidates  # tried in order until one answers (fallback)
        self.health = health
        self.upstream = candidates[0]  # the one being tried; at the end, the one that answered
        self.attempts = 0
        self.failed_attempts: list[str] = []  # "<upstream>: <outcome>", for the error message
        self.reached_any = False  # an attempt got past connecting
        self.upstream_path = upstream_path
        self.method = method
        self.client_headers = client_headers
        self.query = query
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.state = state  # the request's scope state: its access-log entry goes there
        # What the exchange learns, for the settlement.
        self.response: httpx.Response | None = None
        self.meter: StreamMeter | None = None
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self.started = False  # response head sent to the client
        self.status = 500
        self.error: str | None = None  # the error type of a failed request, for the access log
        self.billable = True  # False: the upstream did not take it, or answered an error
        self.reached = True  # False: never connected, so released rather than settled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.inflight.inc()
        exchange = asyncio.ensure_future(self._exchange(send))
        listener = asyncio.ensure_future(_cancel_on_disconnect(receive, exchange))
        answer: Answer | None = None
        try:
            try:
                answer = await exchange
            except asyncio.CancelledError:
                if not _being_cancelled():  # only the listener cancels the exchange alone
                    self.status, self.error = CLIENT_CLOSED, CLIENT_GONE
                else:
                    # The server cancels what is left when its shutdown deadline passes.
                    await _stop(exchange)
                    await self._cut_short(send)
                    raise
            except Exception:
                # The middleware answers it without internals.
                self.status, self.error = 500, InternalError.error_type
                raise
        finally:
            listener.cancel()
            await self._finish()
        # A whole answer goes out after settlement: a client that sends its next request as
        # soon as it has this one's answer finds its slot and reservation released.
        if answer is not None:
            await send(
                {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
            )
            await send({"type": "http.response.body", "body": answer.body})

    async def _exchange(self, send: Send) -> Answer | None:
        """Send upstream; relay a stream as it comes, or return the whole answer to send.

        Failures become an error answer, or an error event once a stream has begun."""
        try:
            with self.upstream.failures(self.settings.upstream_timeout_s):
                async with asyncio.timeout_at(self.arrival.deadline):
                    return await self._forward(send)
        except ProxyError as exc:
            if isinstance(exc, UpstreamFailed | UpstreamTimeout) and len(self.failed_attempts) > 1:
                exc = _all_failed(exc, self.failed_attempts)
            self.status, self.error = exc.status_code, exc.error_type
            if isinstance(exc, UpstreamFailed) and self.response is None:
                self.billable = False  # no answer came back
                # Not even connected: nothing reached an upstream, so no record and no charge.
                self.reached = self.reached_any or not isinstance(exc.__cause__, _NEVER_SENT)
            return await self._fail(send, exc)
        except OSError:  # the server reports a client that is gone
            self.status, self.error = CLIENT_CLOSED, CLIENT_GONE
            return None

    async def _forward(self, send: Send) -> Answer | None:
        response = self.response = await self._answered()
        self.ttft_s = time.perf_counter() - self.arrival.started
        status = response.status_code
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        if status < 300 and is_sse and self.surface.accepts_stream(self.parsed):
            await self._relay(send, response)
            return None
        payload = await response.aread()
        if status >= 500 or 300 <= status < 400:
            # A redirect would name the upstream's own host; Tollgate follows none.
            self.billable = False
            if 300 <= status < 400:
                self.failed_attempts.append(f"{self.upstream.name}: status {status}")
            raise UpstreamFailed(f"Upstream answered with status {status}", reason="status")
        if status < 300:
            try:
                self.usage = self.surface.usage_from_json(payload, self.parsed)
            except UpstreamFailed:
                self.billable = False
                raise
        else:
            self.billable = False  # an upstream 4xx is passed back as it is, uncharged
            self.error = _upstream_error_type(payload)
        self.status = status
        headers = response_headers(response)
        headers += rate_limit_headers(self.decision)
        headers.append((b"x-tollgate-upstream", self.upstream.name.encode()))
        return Answer(status, headers, payload)

    async def _answered(self) -> httpx.Response:
        """Try the candidates in order until one answers: the first response head that is
        neither a 5xx nor a 429, or the last candidate's, whatever it is. Connection
        failures and an attempt's own timeout move on too; nothing has reached the client
        yet, and the body goes again byte for byte under the same reservation."""
        candidates = self.candidates
        last = len(candidates) - 1
        for index, upstream in enumerate(candidates):
            name = upstream.name
            probe = self.health.attempting(name, last_resort=index == last)
            if probe is None:  # taken out since the candidates were chosen
                continue
            if self.attempts:
                self.metrics.fell_back(self.upstream.name, name)
            self.upstream = upstream
            self.attempts += 1
            headers = upstream.headers(
                self.client_headers,
                request_id=self.arrival.request_id,
                client_request_id=self.arrival.client_request_id,
            )
            started = time.perf_counter()
            judged = False
            try:
                try:
                    if index == last:  # bounded by the request's deadline alone
                        response = await self._send(upstream, headers)
                    else:
                        async with asyncio.timeout(upstream.attempt_timeout_s):
                            response = await self._send(upstream, headers)
                except (TimeoutError, httpx.HTTPError) as exc:
                    outcome = "timeout" if isinstance(exc, TimeoutError) else "connect"
                    self.metrics.attempted(name, outcome, time.perf_counter() - started)
                    self.health.failed(name)
                    judged = True
                    self.reached_any |= not isinstance(exc, _NEVER_SENT)
                    self.failed_attempts.append(f"{name}: {_DESCRIBED[outcome]}")
                    if index == last:
                        raise  # translated and counted by failures() around the exchange
                    self.metrics.upstream_errors.labels(outcome).inc()
                    continue
                status = response.status_code
                self.metrics.attempted(name, _outcome(status), time.perf_counter() - started)
                self.reached_any = True
                judged = True
                if status < 500 and status != 429:
                    self.health.succeeded(name)
                    return response
                self.health.failed(name)
                self.failed_attempts.append(f"{name}: status {status}")
                if index == last:
                    return response
                self.metrics.upstream_errors.labels("status").inc()
                with contextlib.suppress(Exception):
                    await response.aclose()
            finally:
                if not judged:  # the request's deadline ran out, or the client left
                    self._unjudged(name, started, probe)
        raise AssertionError("no candidate")  # a Lifecycle always has one

    async def _send(self, upstream: Upstream, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        return await upstream.send(
            self.method,
            self.upstream_path,
            headers=headers,
            content=self.parsed.content,
            query=self.query,
        )

    def _unjudged(self, name: str, started: float, probe: bool) -> None:
        """An attempt cut short by the request's deadline failed; one the client walked away
        from says nothing about the upstream."""
        if asyncio.get_running_loop().time() >= self.arrival.deadline:
            self.metrics.attempted(name, "timeout", time.perf_counter() - started)
            self.health.failed(name)
            self.failed_attempts.append(f"{name}: {_DESCRIBED['timeout']}")
        else:
            self.health.ended(name, probe=probe)

    async def _relay(self, send: Send, response: httpx.Response) -> None:
        """SSE bytes pass through untouched as they arrive; the meter only watches them."""
        meter = self.meter = self.surface.stream_meter()
        headers = response_headers(response) + rate_limit_headers(self.decision)
        headers.append((b"x-tollgate-upstream", self.upstream.name.encode()))
        self.status = response.status_code
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        self.started = True
        active = self.metrics.active_streams
        active.inc()
        try:
            async for chunk in response.aiter_raw():
                meter.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            active.dec()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, send: Send, error: ProxyError) -> Answer | None:
        """Before the head: a JSON error with the rate-limit headers; after it, one final SSE
        `data: {"error": ...}` event and a clean end."""
        if self.started:
            event = self.surface.error_event(error)
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return None
        headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
        headers += [_JSON, *rate_limit_headers(self.decision)]
        return Answer(error.status_code, headers, self.surface.error_body(error))

    async def _cut_short(self, send: Send) -> None:
        """At the server's shutdown deadline: a stream ends with an error event."""
        ending = StoreUnavailable("Tollgate is shutting down; the stream was cut short")
        self.status, self.error = ending.status_code, ending.error_type
        if self.started:
            with contextlib.suppress(Exception):
                event = self.surface.error_event(ending)
                await send({"type": "http.response.body", "body": event, "more_body": False})

    def _final_usage(self) -> Usage:
        if self.usage is not None:
            return self.usage
        if self.meter is not None and self.meter.usage is not None:
            return self.meter.usage
        if not self.billable:
            return Usage(0, 0, "upstream")
        completion = self.meter.completion_estimate() if self.meter is not None else 0
        return Usage(self.parsed.prompt_estimate, completion, "estimated")

    async def _finish(self) -> None:
        """Close upstream, settle limits and credits, record usage and metrics: once, here."""
        try:
            if self.response is not None:
                with contextlib.suppress(Exception):  # a broken connection must not stop this
                    await self.response.aclose()
            arrival, parsed = self.arrival, self.parsed
            if not self.reached:
                self.state["access"] = self._entry(Usage(0, 0, "upstream"), 0.0)
                await self.ledger.release(arrival.key_id, arrival.request_id)
                self.metrics.answered(arrival.route, parsed.model, self.status, arrival.key_name)
                return
            usage = self._final_usage()
            upstream = self.upstream.name
            prices = self.settings.prices
            cost_micros = prices.usage_cost_micros(parsed.model, usage, upstream=upstream)
            cost_usd = micros_to_usd(cost_micros)
            self.state["access"] = self._entry(usage, cost_usd)
            elapsed = time.perf_counter() - arrival.started
            await self.ledger.settle(
                settlement(
                    request_id=arrival.request_id,
                    client_request_id=arrival.client_request_id,
                    ts=arrival.ts,
                    key_id=arrival.key_id,
                    key_name=arrival.key_name,
                    model=parsed.model,
                    route=arrival.route,
                    path=arrival.path,
                    stream=parsed.stream,
                    status=self.status,
                    usage=usage,
                    cost_micros=cost_micros,
                    latency_s=elapsed,
                    ttft_s=self.ttft_s,
                    upstream=upstream,
                    attempts=self.attempts,
                )
            )
            self.metrics.finished(
                route=arrival.route,
                model=parsed.model,
                stream=parsed.stream,
                status=self.status,
                key_name=arrival.key_name,
                elapsed_s=elapsed,
                ttft_s=self.ttft_s,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=cost_usd,
            )
        finally:
            self.metrics.inflight.dec()

    def _entry(self, usage: Usage, cost_usd: float) -> Entry:
        """The request's access-log fields, the same figures as its usage record."""
        arrival, parsed = self.arrival, self.parsed
        return Entry(
            key_id=arrival.key_id,
            key_name=arrival.key_name,
            model=parsed.model,
            stream=parsed.stream,
            upstream=self.upstream.name,
            attempts=self.attempts,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=cost_usd,
            ttft_ms=round(self.ttft_s * 1000, 1) if self.ttft_s is not None else None,
            status=self.status,
            error=self.error if self.status >= 400 else None,
        )


def _outcome(status: int) -> str:
    return "429" if status == 429 else f"{status // 100}xx"


_DESCRIBED = {"timeout": "timed out", "connect": "connection failed"}
_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # an upstream's, as the access log shows it


def _upstream_error_type(payload: bytes) -> str:
    """The `error.type` of an upstream's 4xx answer, passed back as it is (OpenAI and Anthropic
    both nest it there), else `upstream_error`."""
    try:
        error = json.loads(payload).get("error") if len(payload) <= 65536 else None
    except (ValueError, AttributeError, RecursionError):
        error = None
    kind = error.get("type") if isinstance(error, dict) else None
    if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind):
        return kind
    return UpstreamFailed.error_type


def _all_failed(last: ProxyError, failed_attempts: list[str]) -> ProxyError:
    """The error after every attempt failed: 504 when the last one ran out of time, else
    502; the message names each attempt's outcome (upstream names only, never URLs)."""
    outcomes = "; ".join(failed_attempts)
    message = f"All {len(failed_attempts)} upstream attempts failed: {outcomes}"
    error: ProxyError
    if isinstance(last, UpstreamTimeout):
        error = UpstreamTimeout(0, message)
    else:
        error = UpstreamFailed(message, reason=getattr(last, "reason", "status"))
    error.__cause__ = last.__cause__
    return error


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel a task and wait until it has unwound (its upstream connection closed)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
