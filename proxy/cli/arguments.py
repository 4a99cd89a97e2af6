"""The `tollgate` command line: its parser and the value of every flag.

A bad flag or value is one line on stderr naming it, and status 2, before anything listens or
touches the store.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from proxy.cli.status import USAGE_ERROR

MAX_GRACE_S = 30 * 86400  # the admin API's bound on a rotation's grace_seconds
MAX_EXPIRES_IN_S = 100 * 366 * 86400
BUDGET_PERIODS = ("day", "week", "month")
_NONE = ("none", "null", "unlimited")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d{1,12})([smhdw])")

DESCRIPTION = """\
Tollgate: a rate-limiting and metering proxy for OpenAI-compatible APIs.

serve and demo run it, mock-upstream runs a fake provider to try it with; keys, credits and
usage work on the store of TOLLGATE_REDIS_URL as the admin API does. `tollgate COMMAND --help`
says more.

Every error is one line on stderr: status 2 for a bad command line or setting (before anything
listens or touches the store), 1 for a command that could not be carried out (store
unreachable, no such key).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `tollgate keys update: argument --rpm: ...`, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _limit(raw: str) -> int | None:
    """A limit flag: a non-negative integer, or `none` for unlimited."""
    if raw.lower() in _NONE:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a non-negative integer or none, got {raw!r}")
    return int(raw)


def _bounded(low: int, high: int | None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {raw!r}")
        return value

    return parse


_port = _bounded(1, 65535)
_workers = _bounded(1, None)


def _usd(raw: str) -> float:
    """An amount of USD: a finite number (the store checks the balance's bounds)."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of USD, got {raw!r}")
    return value


def _metadata(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {raw!r}")
    return value


def _seconds(raw: str) -> int:
    """A duration such as 90s, 30m, 12h, 30d, 2w or 1d12h, in seconds; 0 needs no unit."""
    text = raw.strip().lower()
    if text == "0":
        return 0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"must be a duration such as 90s, 30m, 12h, 30d or 2w, got {raw!r}"
        )
    return sum(int(n) * UNIT_S[u] for n, u in parts)


def _grace(raw: str) -> int:
    seconds = _seconds(raw)
    if seconds > MAX_GRACE_S:
        raise argparse.ArgumentTypeError(f"must be at most 30d, got {raw!r}")
    return seconds


def _expires_in(raw: str) -> int:
    seconds = _seconds(raw)
    if not 0 < seconds <= MAX_EXPIRES_IN_S:
        raise argparse.ArgumentTypeError(
            f"must be a duration above 0 and up to 100 years, got {raw!r}"
        )
    return seconds


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _instant(raw: str) -> str | None:
    """`--expires-at`: an ISO 8601 date or time (no offset = UTC) as UTC, or `none`."""
    if raw.lower() in _NONE:
        return None
    try:
        moment = datetime.fromisoformat(raw.strip())
        return iso(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 time such as 2030-01-31T12:00:00Z, or none, got {raw!r}"
        ) from None


def _budget(raw: str) -> dict[str, Any] | None:
    """`--budget 50/month`: a USD amount above 0 per day, week or month, or `none`."""
    if raw.lower() in _NONE:
        return None
    amount, _, period = raw.partition("/")
    try:
        value = float(amount.strip().removeprefix("$"))
    except ValueError:
        value = math.nan
    period = period.strip().lower()
    if period not in BUDGET_PERIODS or not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            "must be AMOUNT/PERIOD, a USD amount above 0 per day, week or month (50/month), "
            f"or none, got {raw!r}"
        )
    return {"amount": value, "period": period}


def _model_limit(raw: str) -> tuple[str, dict[str, int | None]] | None:
    """`--model-limit 'gpt-4o*:rpm=10,tpm=20000'`: the pattern is everything before the last
    colon (model names such as ft:gpt-4o:org:id have colons), or `none`."""
    if raw.strip().lower() in _NONE:
        return None
    pattern, _, spec = raw.rpartition(":")
    limits: dict[str, int | None] = {}
    for item in spec.split(","):
        name, equals, value = item.partition("=")
        name = name.strip().lower()
        if not pattern or not equals or name not in ("rpm", "tpm") or name in limits:
            raise argparse.ArgumentTypeError(
                "must be PATTERN:rpm=N,tpm=N with rpm and/or tpm ('gpt-4o*:rpm=10,tpm=20000'), "
                f"or none, got {raw!r}"
            )
        try:
            limits[name] = _limit(value.strip())
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{name} {exc} in {raw!r}") from None
    return pattern, limits


class _ModelLimits(argparse.Action):
    """Repeated `--model-limit` flags, gathered in order (the first matching pattern applies)
    into one model_limits object; `none` alone clears them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,  # what _model_limit returned
        option_string: str | None = None,
    ) -> None:
        given = hasattr(namespace, self.dest)
        limits: dict[str, dict[str, int | None]] | None = getattr(namespace, self.dest, None)
        if values is None or (given and limits is None):
            if given:
                raise argparse.ArgumentError(self, "none cannot be combined with patterns")
            setattr(namespace, self.dest, None)
            return
        pattern, pattern_limits = values
        limits = dict(limits or {})
        if pattern in limits:
            raise argparse.ArgumentError(self, f"pattern {pattern!r} is given twice")
        limits[pattern] = pattern_limits
        setattr(namespace, self.dest, limits)


_KEY_ID = "the key's id (16 hex digits, as `keys list` shows)"
_JSON = "print exactly the admin API's JSON answer instead of text"


def _key_flags(action: argparse.ArgumentParser) -> None:
    """The flags `keys create` and `keys update` share. Absent flags stay absent (SUPPRESS):
    `update` changes only what it is given, and `--rpm none` (or `--rpm=none`) is a value."""
    for flag, what in (
        ("--rpm", "requests per minute"),
        ("--tpm", "tokens per minute"),
        ("--max-concurrency", "requests in flight at once"),
    ):
        action.add_argument(
            flag, type=_limit, default=argparse.SUPPRESS, metavar="N",
            help=f"{what}: a non-negative integer, or none for unlimited",
        )  # fmt: skip
    action.add_argument(
        "--allowed-models", metavar="MODELS",
        help="comma-separated model names or glob patterns (gpt-4o*,o1-mini); empty for all",
    )  # fmt: skip
    action.add_argument(
        "--metadata", type=_metadata, metavar="JSON",
        help='a JSON object kept with the key, e.g. \'{"team": "search"}\'',
    )  # fmt: skip
    action.add_argument(
        "--budget", type=_budget, default=argparse.SUPPRESS, metavar="AMOUNT/PERIOD",
        help="a spending cap in USD per UTC day, Monday week or month (50/month), or none",
    )  # fmt: skip
    expiry = action.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", type=_expires_in, default=argparse.SUPPRESS, metavar="DURATION",
        help="the key stops working this long from now: 90s, 30m, 12h, 30d, 2w",
    )  # fmt: skip
    expiry.add_argument(
        "--expires-at", type=_instant, default=argparse.SUPPRESS, metavar="TIME",
        help="the key stops working at this ISO 8601 time (no offset = UTC), or none",
    )  # fmt: skip
    action.add_argument(
        "--model-limit", dest="model_limits", type=_model_limit, action=_ModelLimits,
        default=argparse.SUPPRESS, metavar="PATTERN:rpm=N,tpm=N",
        help="rpm/tpm for models matching a glob pattern; repeatable, the first match "
        "applies; none clears them",
    )  # fmt: skip
    action.add_argument("--json", action="store_true", help=_JSON)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tollgate", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the proxy (configured by TOLLGATE_* variables)",
        description="Run the proxy. Settings come from TOLLGATE_* variables; these flags "
        "override TOLLGATE_HOST, TOLLGATE_PORT and TOLLGATE_WORKERS.",
    )  # fmt: skip
    serve.add_argument("--host", default=None, help="address to listen on")
    serve.add_argument("--port", type=_port, default=None, help="port to listen on (1-65535)")
    serve.add_argument(
        "--workers", type=_workers, default=None, help="worker processes (at least 1)"
    )

    demo = sub.add_parser(
        "demo", help="in-process store + mock upstream + a demo key",
        description="Try Tollgate with nothing else installed: an in-process store, the "
        "built-in mock upstream and a demo key, printed with commands to try.",
    )  # fmt: skip
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8080, help="port to listen on (8080)")

    mock = sub.add_parser(
        "mock-upstream", help="run the built-in mock upstream (an OpenAI-style server)",
        description="Run the built-in mock upstream, an OpenAI-compatible server that needs "
        "no provider or key, and point `tollgate serve` at it with "
        "TOLLGATE_UPSTREAM_URL=http://HOST:PORT/v1. Models named mock-slow, mock-hang, "
        "mock-error, mock-bad-json, mock-drop and mock-no-usage misbehave on purpose.",
    )  # fmt: skip
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    mock.add_argument("--port", type=_port, default=9000, help="port to listen on (9000)")

    keys = sub.add_parser(
        "keys", help="manage API keys", description="Manage API keys in TOLLGATE_REDIS_URL."
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    create = keys.add_parser(
        "create", help="create a key; its secret is shown only once",
        description="Create a key. Its secret is printed only now. Limits left out are "
        "unlimited.",
    )  # fmt: skip
    create.add_argument("--name", required=True, help="a name for people, 1-200 characters")
    _key_flags(create)
    create.add_argument(
        "--credits", type=_usd, metavar="USD",
        help="a starting balance in USD; without it the balance is unlimited",
    )  # fmt: skip
    update = keys.add_parser(
        "update", help="change a key's name, limits, models, budget, expiry or metadata",
        description="Change a key. Only the flags given change; none removes a limit.",
    )  # fmt: skip
    update.add_argument("id", help=_KEY_ID)
    update.add_argument("--name", help="a new name, 1-200 characters")
    _key_flags(update)
    listing = keys.add_parser("list", help="every key as a table")
    listing.add_argument("--json", action="store_true", help=_JSON)
    for name, what in (
        ("show", "one key's record"),
        ("revoke", "revoke a key (refused from its next request)"),
        ("rotate", "a new secret for a key: same id, limits, balance and history"),
        ("restore", "bring a revoked key back"),
    ):
        action = keys.add_parser(name, help=what)
        action.add_argument("id", help=_KEY_ID)
        action.add_argument("--json", action="store_true", help=_JSON)
        if name == "rotate":
            action.add_argument(
                "--grace", type=_grace, default=None, metavar="DURATION",
                help="how long the old secret keeps working (0 to 30d, e.g. 1h); default 0",
            )  # fmt: skip

    credits = sub.add_parser("credits", help="add or remove credits")
    credits_sub = credits.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = credits_sub.add_parser("add", help="add credits to a key's balance (or remove them)")
    add.add_argument("id", help=_KEY_ID)
    add.add_argument("amount", type=_usd, help="USD; a negative amount removes credits")
    add.add_argument("--json", action="store_true", help=_JSON)
    unlimited = credits_sub.add_parser("unlimited", help="no balance: unlimited credits")
    unlimited.add_argument("id", help=_KEY_ID)
    unlimited.add_argument("--json", action="store_true", help=_JSON)

    usage = sub.add_parser(
        "usage", help="usage by key, model or day; or every usage record as JSON Lines",
        description="Usage in a window of time, across every key or of one: requests, "
        "tokens and cost grouped by key, model or UTC day, as a table or CSV; or the usage "
        "records themselves as JSON Lines. Windows of whole UTC days are answered from "
        "aggregates kept forever; others from the raw records "
        "(TOLLGATE_USAGE_RETENTION_DAYS).",
    )  # fmt: skip
    usage.add_argument("--key", dest="key_id", metavar="ID", help="only this key (default: all)")
    usage.add_argument(
        "--since", metavar="TIME",
        help="start of the window: an ISO 8601 date or time (no offset = UTC) or Unix "
        "seconds; default: 29 days before today (UTC)",
    )  # fmt: skip
    usage.add_argument(
        "--until", metavar="TIME",
        help="end of the window: a date counts whole (--until 2026-11-30 includes that day); "
        "a time or Unix seconds is where the window ends, exclusive; default: the end of "
        "today (UTC)",
    )  # fmt: skip
    usage.add_argument(
        "--group-by", choices=("key", "model", "day"), default=None,
        help="rows per key, model or UTC day; default: key, or day with --key",
    )  # fmt: skip
    usage.add_argument(
        "--format", choices=("table", "csv", "jsonl"), default="table",
        help="table (with a total row), csv (one row per group) or jsonl (the usage records "
        "themselves); default: table",
    )  # fmt: skip
    usage.add_argument(
        "--json", action="store_true",
        help="print the JSON answer: the admin API's usage answer (with --key; key_id null "
        "across all keys)",
    )  # fmt: skip
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad flag is one line on stderr and SystemExit(2)."""
    return build_parser().parse_args(argv)
