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
The `tollgate` command: serve | demo | keys | credits | usage.

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


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tollgate", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy (config from TOLLGATE_* variables)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=_port, default=None)
    serve.add_argument("--workers", type=_workers, default=None)

    demo = sub.add_parser("demo", help="in-process store + mock upstream + a demo key")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=_port, default=8080)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create")
    create.add_argument("--name", required=True)
    update = keys.add_parser("update")
    update.add_argument("id")
    update.add_argument("--name")
    for action in (create, update):
        # Absent flags stay absent (SUPPRESS): `update` changes only what it is given, and
        # `--rpm none` (or `--rpm=none`) is a value, unlimited.
        for flag in ("--rpm", "--tpm", "--max-concurrency"):
            action.add_argument(
                flag, type=_limit, default=argparse.SUPPRESS, help="an integer, or none"
            )
        action.add_argument(
            "--allowed-models", help="comma-separated names or glob patterns; empty for all"
        )
        action.add_argument("--metadata", type=_metadata, help="a JSON object")
        action.add_argument(
            "--budget", type=_budget, default=argparse.SUPPRESS,
            help="USD per day|week|month (50/month), or none",
        )  # fmt: skip
        expiry = action.add_mutually_exclusive_group()
        expiry.add_argument(
            "--expires-in", type=_expires_in, default=argparse.SUPPRESS,
            help="from now: 90s, 30m, 12h, 30d, 2w",
        )  # fmt: skip
        expiry.add_argument(
            "--expires-at", type=_instant, default=argparse.SUPPRESS,
            help="ISO 8601 (no offset = UTC), or none",
        )  # fmt: skip
        action.add_argument(
            "--model-limit", dest="model_limits", type=_model_limit, action=_ModelLimits,
            default=argparse.SUPPRESS, metavar="PATTERN:rpm=N,tpm=N",
            help="limits for models matching a glob pattern; repeatable; none clears them",
        )  # fmt: skip
        action.add_argument("--json", action="store_true")
    create.add_argument("--credits", type=_usd, help="USD")
    listing = keys.add_parser("list")
    listing.add_argument("--json", action="store_true")
    for name in ("show", "revoke", "rotate", "restore"):
        action = keys.add_parser(name)
        action.add_argument("id")
        action.add_argument("--json", action="store_true")
        if name == "rotate":
            action.add_argument(
                "--grace", type=_grace, default=None,
                help="how long the old key keeps working (0 to 30d, e.g. 1h); default 0",
            )  # fmt: skip

    credits = sub.add_parser("credits", help="add or remove credits")
    credits_sub = credits.add_subparsers(dest="action", required=True)
    add = credits_sub.add_parser("add")
    add.add_argument("id")
    add.add_argument("amount", type=_usd, help="USD; negative removes")
    add.add_argument("--json", action="store_true")
    unlimited = credits_sub.add_parser("unlimited", help="no balance: unlimited credits")
    unlimited.add_argument("id")
    unlimited.add_argument("--json", action="store_true")

    usage = sub.add_parser("usage", help="usage of one key, or every record as JSON Lines")
    usage.add_argument("--key", dest="key_id")
    usage.add_argument("--since")
    usage.add_argument("--until")
    usage.add_argument("--group-by", choices=("day", "model"), default="day")
    usage.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    usage.add_argument("--json", action="store_true")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad flag is one line on stderr and SystemExit(2)."""
    return _parser().parse_args(argv)
