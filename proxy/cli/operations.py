"""The commands that work on the store as the admin API does: keys, credits and usage.

Everything the command line says is checked first (status 2, the store untouched); then the
store is opened, the command runs, and a store that is down or refuses is one line, status 1.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from proxy import usage
from proxy.cli.keys import checked_fields, flag_of, run_credits, run_keys
from proxy.cli.status import FAILED, USAGE_ERROR, fail
from proxy.cli.usage import run_usage, window
from proxy.config import Settings
from proxy.errors import ProxyError
from proxy.keys import Keyring
from proxy.store import Store, StoreDown, open_store


def _shown_url(url: str) -> str:
    """The store's URL for an error message: without credentials and query options."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


async def operate(
    settings: Settings, args: argparse.Namespace, *, store: Store | None = None
) -> int:
    """Run a keys, credits or usage command; on `store` when given (tests), else on the store
    of TOLLGATE_REDIS_URL, opened and closed here."""
    action = getattr(args, "action", None)
    fields: dict[str, Any] = {}
    try:
        if args.command == "usage":
            since, until = window(args)
        else:
            fields = checked_fields(args, now=datetime.now(UTC))
    except ProxyError as exc:
        flag = flag_of(exc.param, args)
        where = f"argument {flag}: " if flag else ""
        return fail(f"tollgate {args.command} {action}: {where}{exc.message}", USAGE_ERROR)
    except usage.BadTime as exc:
        return fail(f"tollgate usage: {exc}", USAGE_ERROR)
    opened = store is None
    try:
        store = store or open_store(settings)
    except ValueError as exc:  # a URL redis-py cannot parse
        return fail(f"tollgate: TOLLGATE_REDIS_URL: {exc}", USAGE_ERROR)
    keyring = Keyring(store)
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "keys":
            return await run_keys(keyring, args, as_json, fields)
        if args.command == "credits":
            return await run_credits(keyring, args, as_json, fields)
        return await run_usage(store, keyring, args, since=since, until=until)
    except StoreDown as exc:
        url = _shown_url(settings.redis_url or "")
        return fail(f"tollgate: the store at {url} is unreachable: {exc}", FAILED)
    except ProxyError as exc:  # refused by the store's own checks, e.g. a balance's bounds
        return fail(f"tollgate: {exc.message}", FAILED)
    finally:
        if opened:
            await store.aclose()
