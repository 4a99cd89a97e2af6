"""Budget periods: the UTC calendar day, week (from Monday) or month a time falls in, as the
admission script computes them, for the key records the admin API shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

PERIODS = ("day", "week", "month")


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The period holding `now`, as [start, end) in UTC."""
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        if start.month == 12:
            return start, start.replace(year=start.year + 1, month=1)
        return start, start.replace(month=start.month + 1)
    return day, day + timedelta(days=1)
