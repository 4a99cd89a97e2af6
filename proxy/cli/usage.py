"""`tollgate usage`: a key's usage by day or model (table, csv or the admin API's JSON), or
every usage record as JSON Lines."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from datetime import datetime

from proxy import usage
from proxy.cli.text import table
from proxy.keys import Keyring
from proxy.store import Store


def window(args: argparse.Namespace) -> tuple[datetime, datetime]:
    """`--since` and `--until` as the admin API reads them (usage.BadTime when one is not a
    time)."""
    since_default, until_default = usage.default_window()
    since = usage.parse_time(args.since, default=since_default)
    until = usage.parse_time(args.until, default=until_default)
    return since, until


async def run_usage(
    store: Store,
    keyring: Keyring,
    args: argparse.Namespace,
    *,
    since: datetime,
    until: datetime,
) -> int:
    as_json = bool(args.json)
    if args.format == "jsonl" or not args.key_id:
        ids = [args.key_id] if args.key_id else [r["id"] for r in await keyring.all()]
        async for line in usage.export(store, ids, since=since, until=until):
            sys.stdout.write(line.decode())
        return 0
    answer = await usage.key_usage(
        store, args.key_id, since=since, until=until, group_by=args.group_by
    )
    columns = [args.group_by, "requests", "prompt_tokens", "completion_tokens",
               "total_tokens", "cost_usd"]  # fmt: skip
    rows = answer["groups"] + [{args.group_by: "total", **answer["totals"]}]
    if as_json:
        print(json.dumps(answer))
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(answer["groups"])
        sys.stdout.write(out.getvalue())
    else:
        print(table(rows, columns))
    return 0
