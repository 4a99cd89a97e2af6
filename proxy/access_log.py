"""The access log: one line per request on stdout, written when the request has ended.

The request-id middleware writes every line; the lifecycle of a metered request hands it an
`Entry` through the request's scope state (`state["access"]`), a refusal by admission a
partial one, and the error handlers the error type (`state["error"]`). Nothing here ever
sees a key, its hash or a token.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from proxy.metering import COMPACT_JSON

FORMATS = ("json", "text", "off")
FIELDS = (
    "ts", "request_id", "method", "path", "status", "key_id", "key_name", "model", "upstream",
    "attempts", "stream", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms",
    "ttft_ms", "error",
)  # fmt: skip
_LONGEST = 1000  # characters of a client's path or model name kept in a line
_BARE = re.compile(r"^[A-Za-z0-9._:/@+\-]+$")  # text values printed without quotes


class Entry(NamedTuple):
    """What a metered request adds to its line: its key, model and, once it went upstream, the
    settled figures. `status` and `error` (None: the middleware's) are what the usage record
    and the metrics say, e.g. 499 for a client that left or 502 for a stream cut short."""

    key_id: str | None
    key_name: str | None
    model: str | None
    stream: bool | None
    upstream: str | None = None
    attempts: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    ttft_ms: float | None = None
    status: int | None = None
    error: str | None = None


_NO_ENTRY = Entry(key_id=None, key_name=None, model=None, stream=None)


def error_type(status: int) -> str:
    """The error type of a failure nobody named (an answer not rendered from a ProxyError)."""
    return "invalid_request_error" if status < 500 else "server_error"


class AccessLog:
    """Builds each line once and writes it with one call to stdout, flushed (workers share the
    stream: a line goes out whole, as one write)."""

    def __init__(self, fmt: str) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"access log format must be json or text, got {fmt!r}")
        self.text = fmt == "text"

    def write(
        self,
        *,
        ts: float,
        request_id: str,
        method: str,
        path: str,
        status: int,
        latency_ms: float,
        state: dict[str, Any],
    ) -> None:
        entry: Entry | None = state.get("access")
        error: str | None = None
        if entry is not None and entry.status is not None:
            status = entry.status
            error = entry.error
        if status >= 400 and error is None:
            error = state.get("error") or error_type(status)
        if len(path) > _LONGEST:
            path = path[:_LONGEST]
        e = entry or _NO_ENTRY
        model = e.model if e.model is None or len(e.model) <= _LONGEST else e.model[:_LONGEST]
        record = {
            "ts": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "key_id": e.key_id,
            "key_name": e.key_name,
            "model": model,
            "upstream": e.upstream,
            "attempts": e.attempts,
            "stream": e.stream,
            "prompt_tokens": e.prompt_tokens,
            "completion_tokens": e.completion_tokens,
            "cost_usd": e.cost_usd,
            "latency_ms": latency_ms,
            "ttft_ms": e.ttft_ms,
            "error": error,
        }
        line = _text(record) if self.text else COMPACT_JSON.encode(record)
        try:
            out = sys.stdout
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):  # stdout closed or gone: the request is not failed for it
            pass


def _text(record: dict[str, Any]) -> str:
    """`name=value` pairs (logfmt), fields without a value left out; a value with anything but
    plain characters is quoted and escaped as a JSON string, so a line stays one line."""
    parts = []
    for name, value in record.items():
        if value is None:
            continue
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str):
            shown = value if _BARE.match(value) else encode_basestring_ascii(value)
        else:
            shown = str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)
