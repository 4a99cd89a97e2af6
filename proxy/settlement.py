"""Settlements and in-flight markers, with the wire forms the spool and the store keep.

A `Settlement` is what settles one finished request (its charge and usage record); its JSON
form is versioned, so spool files of older releases still replay. An `InFlight` marker is what
the store keeps of a request in flight, for the sweeper if its process dies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.credits import micros_to_usd
from proxy.limits import Limiter, Settled
from proxy.metering import COMPACT_JSON, Usage

SPOOL_VERSION = 1


def record_time_ms(ts: str) -> int:
    """A usage record's `ts` (ISO 8601, milliseconds) as ms since the epoch, exactly."""
    return round(datetime.fromisoformat(ts).timestamp() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement:
    """What settles one request in the store: its charge and its usage record."""

    key_id: str
    request_id: str
    ts_ms: int  # when the request arrived: records and aggregates are dated by it
    day: str  # YYYY-MM-DD (UTC) of the request, for the per-day aggregates
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    record_json: str  # the usage record, as stored

    def to_json(self) -> str:
        return COMPACT_JSON.encode({"v": SPOOL_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Settlement:
        """Version 1, or the unversioned lines of the first release (the same fields)."""
        version = entry.get("v", 1)
        if version != SPOOL_VERSION:
            raise ValueError(f"unknown spool entry version {version!r}")
        ts_ms = entry.get("ts_ms")
        if ts_ms is None:  # 0.1's lines: the time is in the record
            ts = json.loads(str(entry["record_json"])).get("ts") or f"{entry['day']}T00:00:00+00:00"
            ts_ms = record_time_ms(ts)
        return cls(
            key_id=str(entry["key_id"]),
            request_id=str(entry["request_id"]),
            ts_ms=int(ts_ms),
            day=str(entry["day"]),
            model=str(entry["model"]),
            prompt_tokens=int(entry["prompt_tokens"]),
            completion_tokens=int(entry["completion_tokens"]),
            cost_micros=int(entry["cost_micros"]),
            record_json=str(entry["record_json"]),
        )


def settlement(
    *,
    request_id: str,
    client_request_id: str | None,
    ts: float,
    key_id: str,
    key_name: str,
    model: str,
    route: str,
    path: str,
    stream: bool,
    status: int,
    usage: Usage,
    cost_micros: int,
    latency_s: float | None,
    ttft_s: float | None,
    upstream: str | None = None,
    attempts: int = 0,
) -> Settlement:
    """One finished request's settlement, its usage record included."""
    ts_ms = int(ts * 1000)
    # From the integer, so the record's `ts` and `ts_ms` name the very same millisecond.
    when = datetime.fromtimestamp(ts_ms // 1000, UTC).replace(microsecond=ts_ms % 1000 * 1000)
    record: dict[str, Any] = {
        "request_id": request_id,
        "client_request_id": client_request_id,
        "ts": when.isoformat(timespec="milliseconds"),
        "key_id": key_id,
        "key_name": key_name,
        "model": model,
        "route": route,
        "path": path,
        "stream": stream,
        "status": status,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": micros_to_usd(cost_micros),
        "usage_source": usage.source,
        "latency_ms": round(latency_s * 1000, 1) if latency_s is not None else None,
        "ttft_ms": round(ttft_s * 1000, 1) if ttft_s is not None else None,
        "upstream": upstream,  # the one that answered, else the last tried (None: swept)
        "attempts": attempts,  # upstreams tried, fallbacks included
    }
    if usage.details:
        record["usage_details"] = usage.details
    return Settlement(
        key_id=key_id,
        request_id=request_id,
        ts_ms=ts_ms,
        day=record["ts"][:10],
        model=model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_micros=cost_micros,
        record_json=COMPACT_JSON.encode(record),
    )


@dataclass(frozen=True, slots=True)
class InFlight:
    """What the store keeps of a request in flight, for the sweeper if its process dies.

    Stored inside the admission's reservation, `<micros>:<tokens>:<marker JSON>`.
    """

    ts: float  # time.time() at arrival
    model: str
    route: str  # the surface, as metrics name it
    path: str
    stream: bool
    prompt: int  # prompt-token estimate

    def encode(self) -> str:
        return COMPACT_JSON.encode(
            {
                "ts": self.ts,
                "model": self.model,
                "route": self.route,
                "path": self.path,
                "stream": self.stream,
                "prompt": self.prompt,
            }
        )

    @classmethod
    def decode(cls, reservation: str | None) -> InFlight:
        """From a reservation as the store holds it; missing or torn parts become defaults."""
        try:
            marker = json.loads((reservation or "").split(":", 2)[2])
        except (IndexError, ValueError):
            marker = {}
        if not isinstance(marker, dict):
            marker = {}
        return cls(
            ts=float(marker.get("ts", 0)),
            model=str(marker.get("model", "-")),
            route=str(marker.get("route", "")),
            path=str(marker.get("path", "")),
            stream=bool(marker.get("stream", False)),
            prompt=int(marker.get("prompt", 0)),
        )


async def record(limiter: Limiter, s: Settlement) -> Settled:
    """Run the settle script for one settlement; `settled` when it was settled now.

    Raises StoreDown when the store cannot take it."""
    return await limiter.settle(
        s.key_id,
        request_id=s.request_id,
        day=s.day,
        model=s.model,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        cost_micros=s.cost_micros,
        record_json=s.record_json,
        request_ms=s.ts_ms,
    )
