"""Load for the soak run, from asyncio and aiohttp: slow streams held open (closed loop) and
mixed traffic offered at a fixed rate (open loop). Every request sent is accounted for.

A stream is only ever cut after its answer has begun, so the proxy has admitted it and owes
exactly one usage record for it (status 499); nothing is cancelled before its answer's head
unless the bounded drain runs out, and that counts as an error.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DRAIN_S = 30.0  # how long requests in flight get to end once a phase stops sending
_ERROR_PAUSE_S = 1.0  # a slot that failed waits this long: no busy loop against a dead proxy
_SAMPLES_KEPT = 10


@dataclass(frozen=True, slots=True)
class Request:
    """One kind of request: where, what and which headers, and the exact answer size."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    answer_bytes: int  # the relayed body is the upstream's, byte for byte
    ending: bytes  # how that body ends


@dataclass(slots=True)
class Tally:
    """What one phase sent and what came back; `open_streams` is live, for the sampler."""

    sent: int = 0
    completed: int = 0  # 200 with the whole expected body
    aborted: int = 0  # streams cut by us after their answer began
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    error_samples: list[str] = field(default_factory=list)
    received_bytes: int = 0
    open_streams: int = 0
    dropped: int = 0  # open loop: arrivals not sent because too many were outstanding
    latencies_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> each request's

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < _SAMPLES_KEPT:
            self.error_samples.append(f"{kind}: {detail[:300]}")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_ms(self, kind: str) -> dict[str, float] | None:
        values = sorted(self.latencies_s.get(kind, []))
        if not values:
            return None

        def at(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

        return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0),
                "mean": round(statistics.fmean(values) * 1000, 2)}  # fmt: skip


def _session(connections: int) -> aiohttp.ClientSession:
    # Idle connections are closed by us after 3 s, before uvicorn's 5 s keep-alive closes them
    # under a request about to be sent.
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=3)
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=60)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)


async def _body(response: aiohttp.ClientResponse, tally: Tally) -> tuple[int, bytes]:
    """Read the whole body (counting its bytes as they come); returns its size and end."""
    size, tail = 0, b""
    async for chunk in response.content.iter_any():
        size += len(chunk)
        tally.received_bytes += len(chunk)
        tail = (tail + chunk)[-32:]
    return size, tail


def _whole(request: Request, size: int, tail: bytes) -> bool:
    return size == request.answer_bytes and tail.endswith(request.ending)


async def _stream(
    session: aiohttp.ClientSession, request: Request, tally: Tally, stop: asyncio.Future[None]
) -> bool:
    """One stream, read to its end or cut when `stop` is done; False on an error."""
    tally.sent += 1
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        async with session.post(request.url, data=request.body, headers=request.headers) as answer:
            if answer.status != 200:
                tally.error(
                    f"status {answer.status}", (await answer.read()).decode(errors="replace")
                )
                return False
            tally.open_streams += 1
            reader = asyncio.ensure_future(_body(answer, tally))
            either: list[asyncio.Future[Any]] = [reader, stop]
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not reader.done():  # the phase ended first: cut it, as a client would
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                    answer.close()
                    tally.aborted += 1
                    return True
                size, tail = reader.result()
            finally:
                tally.open_streams -= 1
                reader.cancel()
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__, str(exc))
        return False
    if not _whole(request, size, tail):
        tally.error("short body", f"{size} of {request.answer_bytes} bytes, ending {tail!r}")
        return False
    tally.completed += 1
    tally.latencies_s.setdefault("slow", []).append(loop.time() - sent)
    return True


async def hold_streams(
    request: Request, *, streams: int, duration_s: float, ramp_s: float, tally: Tally
) -> None:
    """Keep `streams` streams open for `duration_s` (started evenly over `ramp_s`), each
    restarted as soon as it ends; then cut those still running and wait (bounded) for the
    ones whose answer has not begun."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    # Bounded in count too: no stream takes under 0.1 s, so no slot can run more than this.
    most = int(duration_s * 10) + 10

    async def slot(index: int) -> None:
        await asyncio.wait({stop}, timeout=ramp_s * index / streams)
        for _ in range(most):
            if stop.done():
                return
            if not await _stream(session, request, tally, stop):
                await asyncio.wait({stop}, timeout=_ERROR_PAUSE_S)

    async with _session(streams + 16) as session:
        slots = [asyncio.ensure_future(slot(i)) for i in range(streams)]
        try:
            await asyncio.wait(slots, timeout=duration_s)
            stop.set_result(None)
            await _settle(slots, tally)
        finally:
            for task in slots:
                task.cancel()


async def _settle(tasks: Sequence[asyncio.Future[None]], tally: Tally) -> None:
    """Wait (bounded) for the requests in flight; any still running is cut and an error."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
    for task in pending:
        task.cancel()
        tally.error("unfinished", f"still waiting for an answer {DRAIN_S:.0f} s after the end")
    await asyncio.gather(*tasks, return_exceptions=True)


async def _once(
    session: aiohttp.ClientSession, kind: str, request: Request, scheduled: float, tally: Tally
) -> None:
    """One request of the open loop; its latency counts from when it was due to be sent."""
    tally.sent += 1
    try:
        async with session.post(request.url, data=request.body, headers=request.headers) as answer:
            payload = await answer.read()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__, str(exc))
        return
    tally.latencies_s.setdefault(kind, []).append(asyncio.get_running_loop().time() - scheduled)
    tally.received_bytes += len(payload)
    if status != 200:
        tally.error(f"status {status}", payload.decode(errors="replace"))
    elif not _whole(request, len(payload), payload[-32:]):
        tally.error("short body", f"{len(payload)} of {request.answer_bytes} bytes")
    else:
        tally.completed += 1


async def offer_mixed(
    requests: Mapping[str, Request],
    pattern: list[str],
    *,
    rate_per_s: float,
    duration_s: float,
    outstanding: int,
    tally: Tally,
) -> None:
    """Send requests at `rate_per_s` for `duration_s` whatever the answers' pace (open loop),
    their kinds cycling through `pattern`; at most `outstanding` in flight, the rest of the
    arrivals are dropped (counted). Then wait (bounded) for those in flight."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate_per_s * duration_s)
    running: set[asyncio.Future[None]] = set()
    async with _session(outstanding) as session:
        try:
            for index in range(total):  # bounded: the arrivals of the whole phase
                due = start + index / rate_per_s
                # Behind schedule, still yield once: the requests sent must get to run.
                await asyncio.sleep(max(0.0, due - loop.time()))
                if len(running) >= outstanding:
                    tally.dropped += 1
                    continue
                kind = pattern[index % len(pattern)]
                sent = asyncio.ensure_future(_once(session, kind, requests[kind], due, tally))
                running.add(sent)
                sent.add_done_callback(running.discard)
            await _settle(list(running), tally)
        finally:
            for task in list(running):
                task.cancel()
