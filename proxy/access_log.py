"""The access log: one line per request on stdout, written when the request has ended.

The request-id middleware writes every line; the lifecycle of a metered request hands it an
`Entry` through the request's scope state (`state["access"]`), a refusal by admission a
partial one, and the error handlers the error type (`state["error"]`). Nothing here ever
sees a key, its hash or a token.
"""

from __future__ import annotations

import re
import sys
import time
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, NamedTuple

FORMATS = ("json", "text", "off")
FIELDS = (
    "ts", "request_id", "method", "path", "status", "key_id", "key_name", "model", "upstream",
    "attempts", "stream", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms",
    "ttft_ms", "error",
)  # fmt: skip
_LONGEST = 1000  # characters of a client's path or model name kept in a line
_BARE = re.compile(r"[A-Za-z0-9._:/@+\-]+")  # text values printed without quotes


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


CLIENT_GONE = "client_closed"  # the error type of a client that left before its answer ended
_NO_ENTRY = Entry(key_id=None, key_name=None, model=None, stream=None)


def open_access_log(fmt: str) -> AccessLog | None:
    """The access log of TOLLGATE_ACCESS_LOG's format; None for `off`."""
    return None if fmt == "off" else AccessLog(fmt)


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
        self._second = -1  # the second `_prefix` is formatted for: one strftime a second
        self._prefix = ""

    def write(
        self,
        *,
        ts: float,
        request_id: str,
        method: str | None,
        path: str | None,
        status: int,
        latency_ms: float,
        state: dict[str, Any],
    ) -> None:
        """`method` and `path` are None only for a request line that could not be parsed."""
        entry: Entry | None = state.get("access")
        error: str | None = None
        if entry is not None and entry.status is not None:
            status = entry.status
            error = entry.error
        if status >= 400 and error is None:
            error = CLIENT_GONE if status == 499 else state.get("error") or error_type(status)
        if path is not None and len(path) > _LONGEST:
            path = path[:_LONGEST]
        when = self._iso(ts)
        if self.text:
            line = _text(when, request_id, method, path, status, latency_ms, entry, error)
        else:
            line = _json(when, request_id, method, path, status, latency_ms, entry, error)
        try:
            out = sys.stdout
            out.write(line)
            out.flush()
        except (OSError, ValueError):  # stdout closed or gone: the request is not failed for it
            pass

    def _iso(self, ts: float) -> str:
        """ISO 8601 in UTC with milliseconds, as a usage record's `ts`."""
        second = int(ts)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((ts - second) * 1000):03d}+00:00"


def _json(
    when: str,
    request_id: str,
    method: str | None,
    path: str | None,
    status: int,
    latency_ms: float,
    e: Entry | None,
    error: str | None,
) -> str:
    """The JSON line, FIELDS in order, assembled directly (a third of json.dumps' cost): what a
    client or an operator chose (method, path, model, key name) is escaped; the rest is
    Tollgate's own (ids of hex digits, upstream names of [A-Za-z0-9_-], error types, numbers)."""
    head = (
        f'{{"ts":"{when}","request_id":"{request_id}","method":{_str(method)},'
        f'"path":{_str(path)},"status":{status},'
    )
    err = "null" if error is None else f'"{error}"'
    if e is None:
        return (
            f'{head}"key_id":null,"key_name":null,"model":null,"upstream":null,"attempts":null,'
            f'"stream":null,"prompt_tokens":null,"completion_tokens":null,"cost_usd":null,'
            f'"latency_ms":{latency_ms},"ttft_ms":null,"error":{err}}}\n'
        )
    model = e.model if e.model is None or len(e.model) <= _LONGEST else e.model[:_LONGEST]
    return (
        f'{head}"key_id":{_quoted(e.key_id)},"key_name":{_str(e.key_name)},'
        f'"model":{_str(model)},"upstream":{_quoted(e.upstream)},'
        f'"attempts":{_num(e.attempts)},"stream":{_bool(e.stream)},'
        f'"prompt_tokens":{_num(e.prompt_tokens)},'
        f'"completion_tokens":{_num(e.completion_tokens)},"cost_usd":{_num(e.cost_usd)},'
        f'"latency_ms":{latency_ms},"ttft_ms":{_num(e.ttft_ms)},"error":{err}}}\n'
    )


def _str(value: str | None) -> str:
    return "null" if value is None else _esc(value)


def _quoted(value: str | None) -> str:
    return "null" if value is None else f'"{value}"'


def _num(value: float | None) -> str:
    return "null" if value is None else str(value)


def _bool(value: bool | None) -> str:
    return "null" if value is None else "true" if value else "false"


def _text(
    when: str,
    request_id: str,
    method: str | None,
    path: str | None,
    status: int,
    latency_ms: float,
    e: Entry | None,
    error: str | None,
) -> str:
    """`name=value` pairs (logfmt), fields without a value left out; a value with anything but
    plain characters is quoted and escaped as a JSON string, so a line stays one line."""
    e = e or _NO_ENTRY
    values = (
        when, request_id, method, path, status, e.key_id, e.key_name, e.model, e.upstream,
        e.attempts, e.stream, e.prompt_tokens, e.completion_tokens, e.cost_usd, latency_ms,
        e.ttft_ms, error,
    )  # fmt: skip
    parts = []
    for name, value in zip(FIELDS, values, strict=True):
        if value is None:
            continue
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str):
            if len(value) > _LONGEST:
                value = value[:_LONGEST]
            shown = value if _BARE.fullmatch(value) else _esc(value)
        else:
            shown = str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts) + "\n"
