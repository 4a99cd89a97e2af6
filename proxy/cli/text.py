"""Answers for people: key records as `field: value` lines, lists as aligned tables; never a
Python repr (`unlimited`, not None; `yes`/`no`; lists and metadata as such)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.cli.arguments import UNIT_S


def print_answer(answer: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(answer) if as_json else text(answer))


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
        text += f", {usd_text(record['budget_spent'])} USD spent"
    if record.get("budget_resets_at"):
        text += f", resets at {record['budget_resets_at']}"
    return text


def _model_limits_text(limits: dict[str, dict[str, int | None]] | None) -> str | None:
    if not limits:
        return None
    # A limit left out is unlimited; a pattern with neither exempts its models from the
    # key's own model limits, as the first matching pattern applies.
    return "; ".join(
        " ".join(
            [pattern, *([f"{k}={v}" for k, v in dims.items() if v is not None] or ["unlimited"])]
        )
        for pattern, dims in limits.items()
    )


def value_text(value: Any) -> str:
    """Any JSON value for people: none, yes/no, a list joined by commas, an object as JSON."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return usd_text(value)
    if isinstance(value, list):
        return ", ".join(value_text(item) for item in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False) if value else "none"
    return str(value)


def limit_text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def credits_cell(value: float | None) -> str:
    return "unlimited" if value is None else usd_text(value)


def _field_text(field: str, record: dict[str, Any], now: datetime) -> str:
    value = record[field]
    if field in ("rpm", "tpm", "max_concurrency"):
        return limit_text(value)
    if field in ("credits", "reserved_credits"):
        return "unlimited" if value is None else f"{usd_text(value)} USD"
    if field == "allowed_models":
        return ", ".join(value) if value else "all"
    if field == "budget":
        return _budget_text(record) or "none"
    if field == "model_limits":
        return _model_limits_text(value) or "none"
    if field == "expires_at":
        if not value:
            return "never"
        expired = _moment(value) <= now
        return f"{value} (expired)" if expired else f"{value} ({_from_now(value, now)})"
    return value_text(value)


def key_text(record: dict[str, Any], now: datetime | None = None) -> str:
    """A key record for people: one `field: value` line each; limits, credits, budget, expiry,
    model limits and a rotated key's grace in words."""
    now = now or datetime.now(UTC)
    lines = []
    for field in record:
        if field in ("key", "budget_spent", "budget_resets_at", "previous_secret_valid_until"):
            continue
        lines.append(f"{field}: {_field_text(field, record, now)}")
    until = record.get("previous_secret_valid_until")
    if until and _moment(until) > now:
        lines.append(f"old key works until: {until} ({_from_now(until, now)})")
    elif until:
        lines.append(f"old key stopped working at: {until} ({_from_now(until, now)})")
    if "key" in record:
        lines.append(f"key: {record['key']}   (shown only now: store it safely)")
    return "\n".join(lines)


def budget_cell(budget: dict[str, Any] | None) -> str:
    return f"{usd_text(budget['amount'])}/{budget['period']}" if budget else "none"


def table(columns: list[str], rows: list[list[str]], *, right: tuple[str, ...] = ()) -> str:
    """Columns two spaces apart, those named in `right` (numbers) aligned right; no trailing
    spaces."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if column in right else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ).rstrip()

    return "\n".join([line(columns), *(line(r) for r in rows)])
