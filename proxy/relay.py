"""The relay: one admitted request from upstream answer to settlement.

Stream bytes pass through untouched as they arrive; a watcher notices a client that went away
and cancels the upstream read at once. `Exchange.finish()` runs exactly once, on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.types import Receive, Scope, Send

from proxy.errors import ProxyError, StoreUnavailable, UpstreamFailed, UpstreamTimeout
from proxy.gateway import Gateway
from proxy.metering import COMPACT_JSON, StreamMeter, Usage, settlement

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer ended


@dataclass(slots=True)
class Admitted:
    """What is known about a request once it is admitted and before it goes upstream.

    Built on arrival; admission fills in `key_name`. (Not frozen: a frozen dataclass sets each
    field through object.__setattr__, and copying one costs more than the whole record.)
    """

    request_id: str
    client_request_id: str | None
    key_id: str
    key_name: str
    model: str
    route: str
    path: str
    stream: bool
    prompt_estimate: int
    started: float  # time.perf_counter()
    deadline: float  # loop time by which the whole upstream exchange must end
    ts: float  # time.time() at arrival

    def marker(self) -> str:
        """What the store keeps of a request in flight, for the sweeper if this process dies."""
        return COMPACT_JSON.encode(
            {
                "ts": self.ts,
                "model": self.model,
                "path": self.path,
                "stream": self.stream,
                "prompt": self.prompt_estimate,
            }
        )


class ClientWatch:
    """Cancels the current task when the client disconnects, until `stop()`.

    Only the awaits between its start and `stop()` can be cancelled by it: `stop()` is called
    with no await in between, so settlement after it always runs to the end.
    """

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.client_gone = False
        self._watching = True
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._watching:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        self._watching = False
        self._watcher.cancel()


class Exchange:
    def __init__(self, gateway: Gateway, admitted: Admitted) -> None:
        self.gateway = gateway
        self.admitted = admitted
        self.response: httpx.Response | None = None
        self.meter: StreamMeter | None = None
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self._finished = False

    def first_byte(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.admitted.started

    async def chunks(self) -> AsyncIterator[bytes]:
        """The upstream body as it arrives, metered. The deadline is RelayResponse's timer."""
        assert self.response is not None
        meter = self.meter = StreamMeter()
        try:
            async for chunk in self.response.aiter_raw():
                meter.feed(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            self.gateway.metrics.upstream_errors.labels("connect").inc()
            raise UpstreamFailed(
                f"Upstream connection failed mid-response: {type(exc).__name__}",
                reason="connect",
            ) from exc

    def final_usage(self, *, upstream_reached: bool) -> Usage:
        if self.usage is not None:
            return self.usage
        if self.meter is not None and self.meter.usage is not None:
            return self.meter.usage
        if not upstream_reached:
            return Usage(0, 0, "upstream")
        completion = self.meter.completion_estimate() if self.meter is not None else 0
        return Usage(self.admitted.prompt_estimate, completion, "estimated")

    async def finish(self, *, status: int, billable: bool = True) -> None:
        """Close upstream, settle limits and credits, record usage and metrics; once only.

        Callers reach it after any cancellation was caught, so its awaits run to the end.
        """
        if self._finished:
            return
        self._finished = True
        await self._finish(status, billable)

    async def _finish(self, status: int, billable: bool) -> None:
        try:
            await self._settle(status, billable)
        finally:
            self.gateway.metrics.inflight.dec()

    async def _settle(self, status: int, billable: bool) -> None:
        gateway, admitted = self.gateway, self.admitted
        if self.response is not None:
            with contextlib.suppress(Exception):  # a broken connection must not stop settling
                await self.response.aclose()
        usage = self.final_usage(upstream_reached=billable)
        prices = gateway.settings.prices
        cost_micros = prices.cost_micros(
            admitted.model, usage.prompt_tokens, usage.completion_tokens
        )
        elapsed = time.perf_counter() - admitted.started
        await gateway.settle(
            settlement(
                request_id=admitted.request_id,
                client_request_id=admitted.client_request_id,
                ts=admitted.ts,
                key_id=admitted.key_id,
                key_name=admitted.key_name,
                model=admitted.model,
                path=admitted.path,
                stream=admitted.stream,
                status=status,
                usage=usage,
                cost_micros=cost_micros,
                latency_s=elapsed,
                ttft_s=self.ttft_s,
            )
        )
        metrics = gateway.metrics
        metrics.finished(
            route=admitted.route,
            model=admitted.model,
            stream=admitted.stream,
            status=status,
            key_name=admitted.key_name,
            elapsed_s=elapsed,
            ttft_s=self.ttft_s,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=cost_micros / 1_000_000,
        )


class RelayResponse:
    """A pure-ASGI streaming response that relays upstream SSE chunk by chunk."""

    def __init__(
        self, exchange: Exchange, *, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.exchange = exchange
        self.status = status
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay until the upstream ends; a client that leaves or the exchange's deadline
        cancels the upstream read at once (one watcher task and one timer per stream, rather
        than a timeout per chunk)."""
        task = asyncio.current_task()
        assert task is not None
        relaying = True
        stopped_by = ""  # "client" or "deadline", when one of them cancelled the relay

        def stop(reason: str) -> None:
            nonlocal stopped_by
            if relaying and not stopped_by:
                stopped_by = reason
                task.cancel()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            stop("client")

        watcher = asyncio.ensure_future(watch_disconnect())
        timer = asyncio.get_running_loop().call_at(
            self.exchange.admitted.deadline, stop, "deadline"
        )
        status = self.status
        gateway = self.exchange.gateway
        gateway.metrics.active_streams.inc()
        try:
            await send({"type": "http.response.start", "status": status, "headers": self.headers})
            try:
                async for chunk in self.exchange.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except ProxyError as exc:
                # After the first byte an error is one final SSE event, then a clean end.
                status = exc.status_code
                await send(
                    {"type": "http.response.body", "body": exc.sse_event(), "more_body": True}
                )
            relaying = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if stopped_by == "client":
                task.uncancel()
                status = CLIENT_CLOSED
            else:
                if stopped_by == "deadline":
                    task.uncancel()
                    gateway.metrics.upstream_errors.labels("timeout").inc()
                    ending: ProxyError = UpstreamTimeout(gateway.settings.upstream_timeout_s)
                else:
                    # The server cancels what is left when its shutdown deadline passes.
                    ending = StoreUnavailable("Tollgate is shutting down; the stream was cut short")
                status = ending.status_code
                with contextlib.suppress(Exception):
                    await send(
                        {
                            "type": "http.response.body",
                            "body": ending.sse_event(),
                            "more_body": False,
                        }
                    )
                if stopped_by != "deadline":
                    raise
        except OSError:  # the server reports a client that is gone
            status = CLIENT_CLOSED
        finally:
            relaying = False
            timer.cancel()
            watcher.cancel()
            gateway.metrics.active_streams.dec()
            await self.exchange.finish(status=status)
