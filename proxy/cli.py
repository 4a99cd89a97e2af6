"""The `tollgate` command: serve | demo | keys | credits | usage.

The only place Settings are built (from TOLLGATE_* and flags). Every error is one line on
stderr: status 2 for a bad command line or setting (before anything listens or touches the
store), 1 for a command that could not be carried out (store unreachable, no such key).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import io
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from proxy.config import ConfigError, Settings, load_settings

USAGE_ERROR = 2  # argparse's own status: the command line or a setting is wrong
STARTUP_FAILURE = USAGE_ERROR
FAILED = 1  # a well-formed command that could not be carried out
GC_THRESHOLD = 10_000  # allocations between young collections; Python's default is 700
# Descriptors `serve` wants per allowed client connection: its socket and the upstream socket
# its request may hold; plus a margin for Redis, the spool, metrics files and the event loop.
FDS_PER_CONNECTION = 2
FDS_SPARE = 256

MAX_GRACE_S = 30 * 86400  # the admin API's bound on a rotation's grace_seconds
MAX_EXPIRES_IN_S = 100 * 366 * 86400
BUDGET_PERIODS = ("day", "week", "month")
_NONE = ("none", "null", "unlimited")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d{1,12})([smhdw])")

log = logging.getLogger("tollgate")


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
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


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


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _instant(raw: str) -> str | None:
    """`--expires-at`: an ISO 8601 date or time (no offset = UTC) as UTC, or `none`."""
    if raw.lower() in _NONE:
        return None
    try:
        moment = datetime.fromisoformat(raw.strip())
        return _iso(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
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
    parser = _Parser(prog="tollgate", description=__doc__)
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


def build_app() -> Any:
    """uvicorn's factory in each worker process: Settings from the (inherited) environment."""
    from proxy.app import create_app

    app = create_app(load_settings(os.environ))
    # What is loaded now lives as long as the process: keep the collector off it, and collect
    # young objects less often (a request allocates a few hundred). Measured: about 7 % less
    # CPU per request and a lower p99 (README, Performance).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 50)
    return app


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _raise_open_files_limit(max_connections: int) -> None:
    """Lift the soft RLIMIT_NOFILE toward the hard one when TOLLGATE_MAX_CONNECTIONS needs more
    descriptors than it allows (workers inherit it); warn when even the hard limit is short."""
    needed = FDS_PER_CONNECTION * max_connections + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.debug("could not raise RLIMIT_NOFILE to %d: %s", wanted, exc)
    if soft < needed:
        log.warning(
            "the open-files limit is %d, below the %d that TOLLGATE_MAX_CONNECTIONS=%d needs "
            "(%d per connection + %d): connections beyond it fail; raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=) or lower TOLLGATE_MAX_CONNECTIONS",
            soft, needed, max_connections, FDS_PER_CONNECTION, FDS_SPARE,
        )  # fmt: skip


def _ca_file_problem(path: Path) -> str | None:
    """Why OpenSSL cannot trust the CAs of TOLLGATE_UPSTREAM_CA_FILE, or None when it can."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return (
            f"TOLLGATE_UPSTREAM_CA_FILE: {str(path)!r} is not a PEM file of CA certificates: {exc}"
        )
    return None


def _serve(settings: Settings) -> int:
    import uvicorn

    if not settings.upstream_configs():
        print(
            "tollgate: TOLLGATE_UPSTREAM_URL or TOLLGATE_UPSTREAMS is required for serve",
            file=sys.stderr,
        )
        return USAGE_ERROR
    if settings.upstream_ca_file is not None:
        problem = _ca_file_problem(settings.upstream_ca_file)
        if problem:
            print(f"tollgate: {problem}", file=sys.stderr)
            return USAGE_ERROR
    _raise_open_files_limit(settings.max_connections)
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tollgate-metrics-")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:  # stale files of a previous run would be counted again
        shutil.rmtree(metrics_dir, ignore_errors=True)
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
    # Workers rebuild Settings from the environment: pass the flags on through it.
    os.environ["TOLLGATE_WORKERS"] = str(settings.workers)
    # uvicorn drains on SIGTERM, then raises the signal again with the handler found here: a
    # drained stop exits 0 (as under --workers) instead of being reported as killed (-15).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from proxy.http_server import http_protocol

    uvicorn.run(
        "proxy.cli:build_app",
        factory=True,
        http=http_protocol(settings),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        proxy_headers=False,
        server_header=False,
    )
    return 0


def _demo(settings: Settings, host: str, port: int) -> int:
    from proxy.demo import listen, run_demo

    try:
        sock = listen(host, port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"tollgate: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return FAILED
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(settings, sock=sock, host=host))
    return 0


def _print(answer: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(answer, indent=None if as_json else 2) if as_json else text(answer))


def _usd_text(value: float) -> str:
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
        count, left = divmod(left, _UNIT_S[unit])
        if count or (unit == "s" and not parts):
            parts.append(f"{count}{unit}")
    span = " ".join(parts[:2])
    return f"in {span}" if seconds >= 0 else f"{span} ago"


def _budget_text(record: dict[str, Any]) -> str | None:
    budget = record.get("budget")
    if not budget:
        return None
    text = f"{_usd_text(budget['amount'])} USD per {budget['period']}"
    if record.get("budget_spent") is not None:
        text += f", {_usd_text(record['budget_spent'])} spent"
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


def _budget_cell(budget: dict[str, Any] | None) -> str | None:
    return f"{_usd_text(budget['amount'])}/{budget['period']}" if budget else None


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _shown_url(url: str) -> str:
    """The store's URL for an error message: without credentials and query options."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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
        payload["expires_at"] = _iso(now + timedelta(seconds=args.expires_in))
    return payload


def rotate_payload(args: argparse.Namespace) -> dict[str, Any]:
    """The body of POST /admin/keys/{id}/rotate that `keys rotate [--grace]` stands for."""
    return {} if args.grace is None else {"grace_seconds": args.grace}


def _flag(param: str | None, args: argparse.Namespace) -> str | None:
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


async def _operate(settings: Settings, args: argparse.Namespace) -> int:
    from proxy import usage
    from proxy.errors import ProxyError
    from proxy.key_fields import grace_seconds, parse_key_fields
    from proxy.keys import Keyring
    from proxy.store import StoreDown, open_store

    # Everything the command line says is checked before the store is touched.
    try:
        action = getattr(args, "action", None)
        fields: dict[str, Any] = {}
        if action in ("create", "update"):
            payload = key_payload(args, now=datetime.now(UTC))
            fields = parse_key_fields(payload, creating=action == "create")
        elif (args.command, action) == ("credits", "unlimited"):
            fields = parse_key_fields({"credits": None}, creating=False)
        elif (args.command, action) == ("keys", "rotate"):
            fields = {"grace_s": grace_seconds(rotate_payload(args))}
        if args.command == "usage":
            since_default, until_default = usage.default_window()
            since = usage.parse_time(args.since, default=since_default)
            until = usage.parse_time(args.until, default=until_default)
    except ProxyError as exc:
        flag = _flag(exc.param, args)
        where = f"argument {flag}: " if flag else ""
        print(f"tollgate {args.command} {action}: {where}{exc.message}", file=sys.stderr)
        return USAGE_ERROR
    except usage.BadTime as exc:
        print(f"tollgate usage: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        store = open_store(settings)
    except ValueError as exc:  # a URL redis-py cannot parse
        print(f"tollgate: TOLLGATE_REDIS_URL: {exc}", file=sys.stderr)
        return USAGE_ERROR
    keyring = Keyring(store)
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "keys":
            return await _keys(keyring, args, as_json, fields)
        if args.command == "credits":
            from proxy.credits import usd_to_micros

            if action == "unlimited":
                return _answer(await keyring.update(args.id, **fields), as_json, args.id)
            record = await keyring.add_credits(args.id, usd_to_micros(args.amount))
            return _answer(record, as_json, args.id)
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
            print(_table(rows, columns))
        return 0
    except StoreDown as exc:
        url = _shown_url(settings.redis_url or "")
        print(f"tollgate: the store at {url} is unreachable: {exc}", file=sys.stderr)
        return FAILED
    except ProxyError as exc:  # refused by the store's own checks, e.g. a balance's bounds
        print(f"tollgate: {exc.message}", file=sys.stderr)
        return FAILED
    finally:
        await store.aclose()


def _answer(record: dict[str, Any] | None, as_json: bool, key_id: str) -> int:
    if record is None:
        print(f"tollgate: no key with id {key_id!r}", file=sys.stderr)
        return FAILED
    _print(record, as_json, key_text)
    return 0


async def _keys(
    keyring: Any, args: argparse.Namespace, as_json: bool, fields: dict[str, Any]
) -> int:
    action = args.action
    if action == "list":
        records = await keyring.all()
        answer = {"object": "list", "data": records}
        columns = ["id", "name", "rpm", "tpm", "max_concurrency", "credits", "budget",
                   "expires_at", "revoked"]  # fmt: skip
        rows = [{**r, "budget": _budget_cell(r.get("budget"))} for r in records]
        _print(answer, as_json, lambda a: _table(rows, columns))
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


def _run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers")}
    if args.command == "demo":
        overrides = {}
    try:
        settings = load_settings(os.environ, overrides)
    except ConfigError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return USAGE_ERROR
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    if args.command == "serve":
        return _serve(settings)
    if args.command == "demo":
        return _demo(settings, args.host, args.port)
    if not settings.redis_url:
        print("tollgate: set TOLLGATE_REDIS_URL to the store the server uses", file=sys.stderr)
        return USAGE_ERROR
    return asyncio.run(_operate(settings, args))


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
        # prometheus-client would take an empty value for multiprocess mode in the working dir.
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    args = parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, so that a closed pipe surfaces inside this `try`
    except BrokenPipeError:
        # The reader went away (`tollgate usage --format jsonl | head -1`): stop quietly, as
        # CPython's documentation on SIGPIPE recommends; stdout goes to /dev/null so that the
        # interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    return status
