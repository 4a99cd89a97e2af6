"""Usage queries for operators: per-key totals by day or model, and the raw record export.

Raw records live in one Redis Stream per key (entry ids are settle times in ms); per-day,
per-model aggregates outlive the raw records' retention and answer whole-day windows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy import store
from proxy.credits import micros_to_usd, usd_to_micros
from proxy.settlement import record_time_ms
from proxy.store import Store

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")
_PAGE = 500


class BadTime(ValueError):
    """A since/until value that is neither ISO 8601 nor Unix seconds."""


def parse_time(raw: str | None, *, default: datetime) -> datetime:
    if raw is None or raw == "":
        return default
    try:
        return datetime.fromtimestamp(float(raw), UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadTime(f"not an ISO 8601 date or datetime, nor Unix seconds: {raw!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _empty() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def _public(counters: dict[str, int]) -> dict[str, Any]:
    return {
        "requests": counters["requests"],
        "prompt_tokens": counters["prompt_tokens"],
        "completion_tokens": counters["completion_tokens"],
        "total_tokens": counters["prompt_tokens"] + counters["completion_tokens"],
        "cost_usd": micros_to_usd(counters["cost_micros"]),
    }


def _whole_days(since: datetime, until: datetime) -> bool:
    return all(t.time() == datetime.min.time() for t in (since, until))


def _aggregate_name(field: str) -> tuple[str, str, str]:
    """Split "<day>|<model>|<counter>" into its parts; the model may itself hold "|"."""
    day, _, rest = field.partition("|")
    model, separator, counter = rest.rpartition("|")
    return (day, model, counter) if separator else ("", "", "")


async def records(
    store_: Store, key_id: str, since: datetime, until: datetime
) -> AsyncIterator[dict[str, Any]]:
    """Raw usage records of one key whose requests arrived in [since, until).

    Records are stored in the order they were written. Most are written within
    LATE_RECORD_MS of their request, so the stream is read from `since` to `until` plus that;
    the rest (replayed from a spool, swept) are also indexed by their request's time.
    """
    client = store_.client
    since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
    stream = store.usage_key(key_id)
    start, end = str(since_ms), f"({until_ms + store.LATE_RECORD_MS}"
    while True:
        low = start
        page: list[tuple[str, dict[str, str]]] = await store_.call(
            lambda: client.xrange(stream, min=low, max=end, count=_PAGE)  # noqa: B023
        )
        for entry_id, fields in page:
            record = json.loads(fields["r"])
            request_ms = record_time_ms(record["ts"])
            written_ms = int(entry_id.partition("-")[0])
            # A late record is yielded by its index below, so never twice.
            if (
                since_ms <= request_ms < until_ms
                and written_ms - request_ms <= store.LATE_RECORD_MS
            ):
                yield record
        if len(page) < _PAGE:
            break
        start = "(" + page[-1][0]
    late: list[str] = await store_.call(
        lambda: client.zrangebyscore(store.late_key(key_id), since_ms, f"({until_ms}")
    )
    for entry_id in late:
        found: list[tuple[str, dict[str, str]]] = await store_.call(
            lambda: client.xrange(stream, min=entry_id, max=entry_id)  # noqa: B023
        )
        for _entry_id, fields in found:  # gone when it outlived the retention
            yield json.loads(fields["r"])


async def key_usage(
    store_: Store, key_id: str, *, since: datetime, until: datetime, group_by: str
) -> dict[str, Any]:
    groups: dict[str, dict[str, int]] = {}
    if _whole_days(since, until):
        aggregates: dict[str, str] = await store_.call(
            lambda: store_.client.hgetall(store.aggregates_key(key_id))
        )
        first, last = since.date(), until.date()
        for field, value in aggregates.items():
            day, model, counter = _aggregate_name(field)
            try:
                in_window = first <= date.fromisoformat(day) < last
            except ValueError:
                continue
            if in_window and counter in COUNTERS:
                group = groups.setdefault(day if group_by == "day" else model, _empty())
                group[counter] += int(value)
    else:
        async for record in records(store_, key_id, since, until):
            name = record["ts"][:10] if group_by == "day" else record["model"]
            group = groups.setdefault(name, _empty())
            group["requests"] += 1
            group["prompt_tokens"] += record["prompt_tokens"]
            group["completion_tokens"] += record["completion_tokens"]
            group["cost_micros"] += usd_to_micros(record["cost_usd"])
    totals = _empty()
    for counters in groups.values():
        for counter in COUNTERS:
            totals[counter] += counters[counter]
    return {
        "key_id": key_id,
        "since": since.isoformat().replace("+00:00", "Z"),
        "until": until.isoformat().replace("+00:00", "Z"),
        "group_by": group_by,
        "groups": [{group_by: name, **_public(groups[name])} for name in sorted(groups)],
        "totals": _public(totals),
    }


def default_window() -> tuple[datetime, datetime]:
    """Today and the 29 days before it, as whole UTC days."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=29), today + timedelta(days=1)


async def export(
    store_: Store, key_ids: list[str], *, since: datetime, until: datetime
) -> AsyncIterator[bytes]:
    """Every raw record of the given keys in the window, as JSON Lines, key after key."""
    for key_id in key_ids:
        async for record in records(store_, key_id, since, until):
            yield json.dumps(record, separators=(",", ":")).encode() + b"\n"
