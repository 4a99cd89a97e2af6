"""`tollgate keys ...` and `tollgate credits ...`: the admin API's key operations on the store.

`key_payload` and `rotate_payload` give the admin API body that the flags stand for, so that
the admin API's own checks (proxy/key_fields.py) run on it before the store is touched.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from proxy.cli.arguments import iso
from proxy.cli.status import FAILED, fail
from proxy.cli.text import budget_cell, credits_cell, key_text, limit_text, print_answer, table
from proxy.credits import usd_to_micros
from proxy.key_fields import grace_seconds, parse_key_fields
from proxy.keys import Keyring


def key_payload(args: argparse.Namespace, *, now: datetime) -> dict[str, Any]:
    """The admin API body (POST /admin/keys or PATCH /admin/keys/{id}) that `keys create|update`
    flags stand for; `--expires-in` becomes an absolute `expires_at` from `now`."""
    payload: dict[str, Any] = {}
    if args.name is not None:
        payload["name"] = args.name
    for field in ("rpm", "tpm", "max_concurrency"):
        if hasattr(args, field):  # given, possibly as none (unlimited)
            payload[field] = getattr(args, field)
    if args.allowed_models is not None:
        payload["allowed_models"] = [m for m in args.allowed_models.split(",") if m] or None
    if args.metadata is not None:
        payload["metadata"] = args.metadata
    if args.action == "create" and args.credits is not None:
        payload["credits"] = args.credits
    for field in ("budget", "expires_at", "model_limits"):
        if hasattr(args, field):  # given, possibly as none
            payload[field] = getattr(args, field)
    if hasattr(args, "expires_in"):
        payload["expires_at"] = iso(now + timedelta(seconds=args.expires_in))
    return payload


def rotate_payload(args: argparse.Namespace) -> dict[str, Any]:
    """The body of POST /admin/keys/{id}/rotate that `keys rotate [--grace]` stands for."""
    return {} if args.grace is None else {"grace_seconds": args.grace}


def flag_of(param: str | None, args: argparse.Namespace) -> str | None:
    """The flag behind an admin API `param` (`budget.amount` -> `--budget`)."""
    field = (param or "").split(".", 1)[0]
    if field == "expires_at" and hasattr(args, "expires_in"):
        return "--expires-in"
    if field == "model_limits":
        return "--model-limit"
    if field == "grace_seconds":
        return "--grace"
    known = {"name", "rpm", "tpm", "max_concurrency", "allowed_models", "metadata", "credits",
             "budget", "expires_at"}  # fmt: skip
    return "--" + field.replace("_", "-") if field in known else None


def keys_table(records: list[dict[str, Any]]) -> str:
    """`keys list` for people: one key a line."""
    columns = ["id", "name", "rpm", "tpm", "max_concurrency", "credits", "budget",
               "expires_at", "revoked"]  # fmt: skip
    rows = [
        [r["id"], r["name"], limit_text(r["rpm"]), limit_text(r["tpm"]),
         limit_text(r["max_concurrency"]), credits_cell(r["credits"]), budget_cell(r["budget"]),
         r["expires_at"] or "never", "yes" if r["revoked"] else "no"]
        for r in records
    ]  # fmt: skip
    return table(columns, rows, right=("rpm", "tpm", "max_concurrency", "credits"))


def checked_fields(args: argparse.Namespace, *, now: datetime) -> dict[str, Any]:
    """The key fields a `keys` or `credits` command changes, checked as the admin API checks
    them (a ProxyError naming the field when one is refused)."""
    action = args.action
    if action in ("create", "update"):
        return parse_key_fields(key_payload(args, now=now), creating=action == "create")
    if (args.command, action) == ("credits", "unlimited"):
        return parse_key_fields({"credits": None}, creating=False)
    if (args.command, action) == ("keys", "rotate"):
        return {"grace_s": grace_seconds(rotate_payload(args))}
    return {}


def _answer(record: dict[str, Any] | None, as_json: bool, key_id: str) -> int:
    if record is None:
        return fail(f"tollgate: no key with id {key_id!r}", FAILED)
    print_answer(record, as_json, key_text)
    return 0


async def run_keys(
    keyring: Keyring, args: argparse.Namespace, as_json: bool, fields: dict[str, Any]
) -> int:
    action = args.action
    if action == "list":
        records = await keyring.all()
        answer = {"object": "list", "data": records}
        print_answer(answer, as_json, lambda a: keys_table(records))
        return 0
    if action == "rotate":
        return _answer(await keyring.rotate(args.id, **fields), as_json, args.id)
    if action in ("show", "revoke", "restore"):
        method: Callable[[str], Awaitable[dict[str, Any] | None]] = {
            "show": keyring.get, "revoke": keyring.revoke, "restore": keyring.restore,
        }[action]  # fmt: skip
        return _answer(await method(args.id), as_json, args.id)
    if action == "create":
        return _answer(await keyring.create(**fields), as_json, "")
    return _answer(await keyring.update(args.id, **fields), as_json, args.id)


async def run_credits(
    keyring: Keyring, args: argparse.Namespace, as_json: bool, fields: dict[str, Any]
) -> int:
    if args.action == "unlimited":
        return _answer(await keyring.update(args.id, **fields), as_json, args.id)
    record = await keyring.add_credits(args.id, usd_to_micros(args.amount))
    return _answer(record, as_json, args.id)
