"""`tollgate usage`: requests, tokens and cost by key, model or day, across every key or of
one (a table, CSV or JSON), or the usage records themselves as JSON Lines.

One key's answer is the admin API's (`GET /admin/keys/{id}/usage`); across keys, and by key,
the CLI adds up those answers, in micro-dollars so that sums are exact.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from datetime import date, datetime, timedelta
from typing import Any

from proxy import usage
from proxy.cli.status import FAILED, fail
from proxy.cli.text import table
from proxy.credits import micros_to_usd, usd_to_micros
from proxy.keys import Keyring
from proxy.store import Store

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
_SUMMED = COUNTERS[:-1]  # as they are; the cost is added up in micro-dollars


def _is_date(raw: str | None) -> bool:
    """A calendar date such as 2026-11-30 (not Unix seconds, not a time of day)."""
    if not raw:
        return False
    try:
        float(raw)
    except ValueError:
        pass
    else:
        return False
    try:
        date.fromisoformat(raw)
    except ValueError:
        return False
    return True


def _time(flag: str, raw: str | None, default: datetime) -> datetime:
    try:
        return usage.parse_time(raw, default=default)
    except usage.BadTime as exc:
        raise usage.BadTime(f"argument {flag}: {exc}") from None


def window(args: argparse.Namespace) -> tuple[datetime, datetime]:
    """`--since` and `--until` as the admin API's since and until, [since, until): a date given
    to `--until` counts whole, so the window ends at the next day's start. usage.BadTime names
    the flag that is not a time."""
    since_default, until_default = usage.default_window()
    since = _time("--since", args.since, since_default)
    until = _time("--until", args.until, until_default)
    if _is_date(args.until):
        try:
            until += timedelta(days=1)
        except OverflowError:
            raise usage.BadTime(f"argument --until: too late: {args.until!r}") from None
    if until <= since:
        raise usage.BadTime("argument --until: must be later than --since")
    return since, until


def _public(counters: dict[str, int]) -> dict[str, Any]:
    return {
        **{c: counters[c] for c in _SUMMED},
        "cost_usd": micros_to_usd(counters["cost_micros"]),
    }


def _add(into: dict[str, int], counters: dict[str, Any]) -> None:
    for counter in _SUMMED:
        into[counter] += counters[counter]
    into["cost_micros"] += usd_to_micros(counters["cost_usd"])


async def usage_answer(
    store: Store,
    records: list[dict[str, Any]],
    *,
    key_id: str | None,
    since: datetime,
    until: datetime,
    group_by: str,
) -> dict[str, Any]:
    """The usage of `records`' keys in the shape of the admin API's answer, for one key
    (`key_id`) or all of them (`key_id` null); grouped by key, a group names the key."""
    if key_id is not None and group_by != "key":
        return await usage.key_usage(store, key_id, since=since, until=until, group_by=group_by)
    empty = dict.fromkeys((*_SUMMED, "cost_micros"), 0)
    groups: dict[str, dict[str, int]] = {}
    totals = dict(empty)
    for record in records:
        answer = await usage.key_usage(
            store, record["id"], since=since, until=until,
            group_by="day" if group_by == "key" else group_by,
        )  # fmt: skip
        if group_by == "key":
            if answer["totals"]["requests"]:
                _add(groups.setdefault(record["id"], dict(empty)), answer["totals"])
        else:
            for group in answer["groups"]:
                _add(groups.setdefault(group[group_by], dict(empty)), group)
        _add(totals, answer["totals"])
    names = {r["id"]: r["name"] for r in records}
    if group_by == "key":  # by name, as people look a key up
        order = sorted(groups, key=lambda key: (names[key], key))
    else:
        order = sorted(groups)
    return {
        "key_id": key_id,
        "since": since.isoformat().replace("+00:00", "Z"),
        "until": until.isoformat().replace("+00:00", "Z"),
        "group_by": group_by,
        "groups": [
            {
                group_by: name,
                **({"name": names[name]} if group_by == "key" else {}),
                **_public(groups[name]),
            }
            for name in order
        ],
        "totals": _public(totals),
    }


def _cells(row: dict[str, Any], columns: list[str]) -> list[str]:
    return [f"{row[c]:.6f}" if c == "cost_usd" else str(row[c]) for c in columns]


def usage_table(answer: dict[str, Any]) -> str:
    """The groups and a total row, counters aligned right, cost with its 6 decimals."""
    group_by = answer["group_by"]
    labels = [group_by, "name"] if group_by == "key" else [group_by]
    total = {group_by: "total", "name": "", **answer["totals"]}
    rows = [_cells(g, labels + list(COUNTERS)) for g in [*answer["groups"], total]]
    return table(labels + list(COUNTERS), rows, right=COUNTERS)


def usage_csv(answer: dict[str, Any]) -> str:
    """One row per group (no total row), cost with its 6 decimals."""
    group_by = answer["group_by"]
    columns = ([group_by, "name"] if group_by == "key" else [group_by]) + list(COUNTERS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(_cells(g, columns) for g in answer["groups"])
    return out.getvalue()


async def run_usage(
    store: Store,
    keyring: Keyring,
    args: argparse.Namespace,
    *,
    since: datetime,
    until: datetime,
) -> int:
    if args.key_id:
        record = await keyring.get(args.key_id)
        if record is None:
            return fail(f"tollgate: no key with id {args.key_id!r}", FAILED)
        records = [record]
    else:
        records = await keyring.all()
    if args.format == "jsonl":
        ids = [r["id"] for r in records]
        async for line in usage.export(store, ids, since=since, until=until):
            sys.stdout.write(line.decode())
        return 0
    answer = await usage_answer(
        store, records, key_id=args.key_id, since=since, until=until,
        group_by=args.group_by or ("day" if args.key_id else "key"),
    )  # fmt: skip
    if args.json:
        print(json.dumps(answer))
    elif args.format == "csv":
        sys.stdout.write(usage_csv(answer))
    else:
        print(usage_table(answer))
    return 0
