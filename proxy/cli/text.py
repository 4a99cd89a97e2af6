"""Answers for people: key records as `field: value` lines, lists as aligned tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.cli.arguments import UNIT_S


def print_answer(answer: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(answer, indent=None if as_json else 2) if as_json else text(answer))


def usd_text(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _moment(when: str) -> datetime:
    moment = datetime.fromisoformat(when)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _from_now(when: str, now: datetime) -> str:
    """`in 29d 23h`, `3m 20s ago`: the two largest units between now and an ISO 8601 time."""
    seconds = int((_moment(when) - now).total_seconds())
    left = abs(seconds)
    parts: list[str] = []
    for unit in ("d", "h", "m", "s"):
        count, left = divmod(left, UNIT_S[unit])
        if count or (unit == "s" and not parts):
            parts.append(f"{count}{unit}")
    span = " ".join(parts[:2])
    return f"in {span}" if seconds >= 0 else f"{span} ago"


def _budget_text(record: dict[str, Any]) -> str | None:
    budget = record.get("budget")
    if not budget:
        return None
    text = f"{usd_text(budget['amount'])} USD per {budget['period']}"
    if record.get("budget_spent") is not None:
        text += f", {usd_text(record['budget_spent'])} spent"
    if record.get("budget_resets_at"):
        text += f", resets at {record['budget_resets_at']}"
    return text


def _model_limits_text(limits: dict[str, dict[str, int | None]] | None) -> str | None:
    if not limits:
        return None
    return "; ".join(
        " ".join([pattern] + [f"{k}={v if v is not None else 'none'}" for k, v in dims.items()])
        for pattern, dims in limits.items()
    )


def key_text(record: dict[str, Any], now: datetime | None = None) -> str:
    """A key record for people: one `field: value` line each; budget, expiry, model limits and
    a rotated key's grace in words."""
    now = now or datetime.now(UTC)
    lines = []
    for field, value in record.items():
        if field in ("key", "budget_spent", "budget_resets_at", "previous_secret_valid_until"):
            continue
        if field == "budget":
            value = _budget_text(record)
        elif field == "model_limits":
            value = _model_limits_text(value)
        elif field == "expires_at" and value:
            expired = _moment(value) <= now
            value += " (expired)" if expired else f" ({_from_now(value, now)})"
        lines.append(f"{field}: {value}")
    until = record.get("previous_secret_valid_until")
    if until and _moment(until) > now:
        lines.append(f"old key works until: {until} ({_from_now(until, now)})")
    elif until:
        lines.append(f"old key stopped working at: {until} ({_from_now(until, now)})")
    if "key" in record:
        lines.append(f"key: {record['key']}   (shown only now: store it safely)")
    return "\n".join(lines)


def budget_cell(budget: dict[str, Any] | None) -> str | None:
    return f"{usd_text(budget['amount'])}/{budget['period']}" if budget else None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
