"""A bounded fuzz of every client-facing route over raw sockets, against a real stack.

A seeded stream of odd requests (any method; dot segments, encoded separators and NULs in the
path; absolute-form and overlong targets; broken, huge and hostile JSON; lying content-lengths
and chunked bodies; good, revoked and bad keys; client request ids, reused ones too) goes to a
real `tollgate serve`. The tests then check what clients saw and what the upstream received:
no 500, one usage record for each request that reached the upstream, only forwardable paths
upstream, and a fresh Tollgate `x-request-id` on every response.

The suite sends a few hundred requests. By hand, for more (the seed is printed on failure):

    TOLLGATE_FUZZ_REQUESTS=5000 TOLLGATE_FUZZ_SECONDS=300 TOLLGATE_FUZZ_SEED=1234 \\
        .venv/bin/pytest tests/integration/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from tests.integration.conftest import Stack, running_mock, running_stack
from tests.servers import ADMIN_TOKEN, RedisServer, wait_for

REQUESTS = int(os.environ.get("TOLLGATE_FUZZ_REQUESTS", "500"))
SECONDS = float(os.environ.get("TOLLGATE_FUZZ_SECONDS", "25"))
SEED = int(os.environ.get("TOLLGATE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CONCURRENCY = 8
READ_TIMEOUT_S = 15.0
MAX_BODY_BYTES = 64 * 1024
SETTINGS = {
    "TOLLGATE_PASSTHROUGH_PATHS": "/v1/moderations,/v1/audio/*",
    "TOLLGATE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "TOLLGATE_UPSTREAM_TIMEOUT": "10",
}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
# (natural method, path, body kind)
ROUTES = (
    *(("POST", p, "chat") for p in ("/v1/chat/completions", "/chat/completions",
      "/api/chat/completions", "/api/v1/chat/completions", "/api/ai/chat/completions")),
    *(("POST", "/v1/chat/completions", "chat"),) * 4,
    ("GET", "/v1/models", "none"),
    ("GET", "/api/v1/models", "none"),
    ("GET", "/v1/models/gpt-4o-mini", "none"),
    ("GET", "/v1/models/no-such-model", "none"),
    *(("POST", "/v1/embeddings", "embeddings"), ("POST", "/v1/completions", "completions"),
      ("POST", "/v1/responses", "responses"), ("POST", "/v1/messages", "messages"),
      ("POST", "/v1/moderations", "moderations"), ("POST", "/v1/audio/speech", "audio"),
      ("POST", "/v1/audio/transcriptions", "audio")) * 2,
    ("GET", "/v1/files", "none"),
    ("POST", "/v1/batches", "files"),
    ("POST", "/v1/fine_tuning/jobs", "files"),
    ("GET", "/v1/organization/users", "none"),
    ("POST", "/admin/keys", "admin"),
    ("GET", "/admin/keys", "none"),
    ("GET", "/healthz", "none"),
    ("GET", "/readyz", "none"),
    ("GET", "/metrics", "none"),
    ("GET", "/", "none"),
    ("POST", "/tenant-b/v1/chat/completions", "chat"),
    ("GET", "/no/such/path", "none"),
)  # fmt: skip
# Targets that try to leave the route they name, or to reach what no route forwards.
ESCAPES = (
    "/v1/./chat/completions", "/v1/chat/./completions", "/v1/../admin/keys", "/v1/%2e%2e/%2e%2e/x",
    "/v1/%2E%2E/admin/keys", "/v1/%2e/moderations", "/v1/audio/../files", "/v1/audio/./../files",
    "/v1/audio/%2e%2e/files", "/v1/audio/..%2ffiles", "/v1/audio/..%2Ffiles",
    "/v1/audio/x/../../../admin/keys", "/v1/audio/speech%3f/../../files",
    "/v1/audio/a%23/../../files", "/v1/audio/%5c..%5c..%5cfiles", "/v1/audio\\..\\files",
    "/v1/audio/x%00/../../files", "/v1/audio/%2E%2E%2F%2E%2E%2Fadmin%2Fkeys",
    "/v1/moderations/../files", "/v1/moderations%2f..%2ffiles", "/v1/moderations/..",
    "/v1/embeddings/..", "/v1//chat/completions", "/v1/chat/completions/",
    "/v1/models/..%2f..%2fadmin%2fkeys", "/v1/models/%2e%2e", "/api/v1/../../admin/keys",
    "/v1/../../tenant-b/v1/chat/completions", "//v1/chat/completions",
    "/v1/responses/../../admin/keys", "/v1/messages%2f..%2f..%2fadmin%2fkeys",
    "/V1/chat/completions",
    "/v1/chat/completions%3f", "/v1/chat/completions%23x", "/v1/chat/completions%00",
    "/v1/files?../chat/completions", "/v1/chat%2fcompletions", "/api/v1/%2e%2e/files",
)  # fmt: skip
MODELS: tuple[Any, ...] = (
    *("gpt-4o-mini",) * 24, "gpt-4o", "gpt-4o", "mock-error", "mock-bad-json", "mock-drop",
    "mock-no-usage", "missing-model", "a|b", "gpt|4o|mini", "модель-ü-模型", "m\ud800", "\ud800",
    "x" * 300, "y" * 5000, "", " ", 42, None, ["gpt-4o-mini"], "openai/gpt-4o-mini",
    "../../admin/keys", "gpt-4o-mini\n", "gpt-4o-mini\x00",
)  # fmt: skip
TEXTS = ("Say hello", "", "ü" * 50, "\ud800", "\x00", "a" * 3000, "😀" * 20, "<script>", "\\u0000")
REUSED_IDS = ("fuzz-reused-1", "fuzz-reused-2", "req_123", "same")
ODD_IDS = ("", " ", "a b", "x" * 200, "../../etc", "ü", "id;drop", "a,b", "\tid", "%2f")
# uvicorn's own answer to a request it cannot parse, before any Tollgate code runs.
HTTP_LAYER_400 = b"Invalid HTTP request received."
FORWARDABLE = re.compile(
    r"/v1/(chat/completions|models|embeddings|completions|responses|messages|moderations"
    r"|audio/.+)"
)
SMUGGLED = ("%2f", "%5c", "%3f", "%23", "%00", "\\", "?", "#")


@dataclass(frozen=True, slots=True)
class Case:
    """One fuzzed request, exactly as its bytes go on the wire."""

    index: int
    method: str
    target: bytes
    head: tuple[bytes, ...]
    payload: bytes
    half_close: bool  # a content-length longer than the body: end our side so no one waits
    client_ids: tuple[str, ...]

    def wire(self) -> bytes:
        request_line = self.method.encode() + b" " + self.target + b" HTTP/1.1"
        return b"\r\n".join((request_line, *self.head, b"Connection: close", b"", self.payload))

    def describe(self) -> str:
        head = b" | ".join(h[:80] for h in self.head if not h.lower().startswith(b"x-fuzz"))
        return (
            f"#{self.index} {self.method} {self.target[:160]!r} [{head!r}] "
            f"body {len(self.payload)} B {self.payload[:120]!r}"
        )


class Fuzzer:
    """Builds seeded cases; keys are read from the stack, their use is drawn from the seed."""

    def __init__(self, rng: random.Random, *, port: int, valid_key: str, revoked_key: str) -> None:
        self.rng = rng
        self.port = port
        self.valid = valid_key
        self.revoked = revoked_key

    def case(self, index: int) -> Case:
        rng = self.rng
        method, path, kind = rng.choice(ROUTES)
        if rng.random() < 0.2:
            method = rng.choice(METHODS)
        draw = rng.random()
        if draw < 0.15:
            path = rng.choice(ESCAPES)
        elif draw < 0.4:
            for _ in range(rng.randint(1, 3)):
                path = self._mutate(path)
        headers, client_ids = self._headers(path)
        body = self._body(kind) if method not in ("GET", "HEAD") or rng.random() < 0.1 else b""
        framing, payload, half_close = self._framing(body, method)
        return Case(
            index=index,
            method=method,
            target=self._target(path),
            head=tuple(headers + framing),
            payload=payload,
            half_close=half_close,
            client_ids=client_ids,
        )

    def _mutate(self, path: str) -> str:
        rng = self.rng
        slashes = [i for i, c in enumerate(path) if c == "/"] or [0]
        at = rng.choice(slashes)
        match rng.randrange(11):
            case 0:
                segment = rng.choice(("/.", "/..", "/%2e", "/%2E%2e", "/%2e%2e", "/.%2E"))
                return path[:at] + segment + path[at:]
            case 1 if at > 0:
                return path[:at] + rng.choice(("%2f", "%2F")) + path[at + 1 :]
            case 2 if at > 0:
                return path[:at] + rng.choice(("\\", "%5c", "%5C")) + path[at + 1 :]
            case 3:
                where = rng.randrange(len(path) + 1)
                odd = rng.choice(("%3f", "%3F", "%23", "%00", "%20", "%", "%zz", ";x", "%2e"))
                return path[:where] + odd + path[where:]
            case 4:
                return path[:at] + "/" + path[at:]
            case 5:
                return path + rng.choice(("/", "/.", "/..", "//"))
            case 6:
                queries = ("", "a=1", "model=x&stream=true", "x=%2f..%2fadmin", "../admin/keys",
                           "a=" + "b" * 2000, "%00", "q=ü")  # fmt: skip
                return path + "?" + rng.choice(queries)
            case 7:
                return rng.choice(("http://evil", f"http://127.0.0.1:{self.port}",
                                   "https://evil:443", "http://evil:80")) + path  # fmt: skip
            case 8:
                return path + "/" + "a" * rng.choice((300, 4000, 9000, 9000, 70_000))
            case 9:
                where = rng.randrange(len(path) + 1)
                return path[:where] + rng.choice(("é", "%C3%A9", "模型", "%ff")) + path[where:]
            case 10:
                return path.upper() if rng.random() < 0.5 else path.replace("/v1/", "/v2/")
        return path

    def _target(self, path: str) -> bytes:
        rng = self.rng
        target = path.encode("utf-8")
        draw = rng.random()
        if draw < 0.01:
            return b"*"
        if draw < 0.02:  # bytes no request line may hold; the HTTP layer refuses them
            where = rng.randrange(len(target) + 1)
            return target[:where] + rng.choice((b" ", b"\x00", b"\t", b"\x7f")) + target[where:]
        return target

    def _auth(self, path: str) -> list[bytes]:
        rng = self.rng
        if path.startswith("/admin") and rng.random() < 0.3:
            return [b"Authorization: Bearer " + ADMIN_TOKEN.encode()]
        draw = rng.random()
        if draw < 0.7:
            return [b"Authorization: Bearer " + self.valid.encode()]
        if draw < 0.76:
            return [b"Authorization: Bearer " + self.revoked.encode()]
        if draw < 0.79:
            return [b"x-api-key: " + self.valid.encode()]
        if draw < 0.85:
            return []
        odd = (b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Bearer sk-tg-" + b"0" * 16 + b"_" +
               b"a" * 32, b"Bearer " + self.valid[:-1].encode(), b"bearer " + self.valid.encode(),
               b"Bearer  " + self.valid.encode(), b"Bearer " + self.valid.encode() + b" extra",
               b"Bearer sk-tg-\xc3\xbc" + b"a" * 40, b"Bearer " + ADMIN_TOKEN.encode(),
               b"Bearer " + self.valid.encode() * 40)  # fmt: skip
        return [b"Authorization: " + rng.choice(odd)]

    def _client_id(self) -> str:
        rng = self.rng
        draw = rng.random()
        if draw < 0.4:
            return "fuzz-" + uuid.UUID(int=rng.getrandbits(128)).hex
        if draw < 0.8:
            return rng.choice(REUSED_IDS)
        return rng.choice(ODD_IDS)

    def _headers(self, path: str) -> tuple[list[bytes], tuple[str, ...]]:
        rng = self.rng
        headers = [b"Host: 127.0.0.1:%d" % self.port] if rng.random() < 0.97 else []
        if rng.random() < 0.85:
            headers.append(
                b"Content-Type: "
                + rng.choice((b"application/json",) * 6 + (b"text/plain", b"application/x-www-"
                             b"form-urlencoded", b"application/json; charset=latin-1"))
            )  # fmt: skip
        headers += self._auth(path)
        client_ids: list[str] = []
        for name in (b"x-request-id", b"x-client-request-id", b"X-Request-ID"):
            if rng.random() < 0.35:
                client_ids.append(self._client_id())
                headers.append(name + b": " + client_ids[-1].encode())
        draw = rng.random()
        if draw < 0.08:
            headers += [b"x-fuzz-%d: %d" % (i, rng.getrandbits(64))
                        for i in range(rng.randint(20, 150))]  # fmt: skip
        elif draw < 0.1:
            headers.append(b"x-fuzz-big: " + b"v" * rng.choice((8000, 30_000, 80_000)))
        elif draw < 0.16:
            headers.append(
                rng.choice((b"Expect: 100-continue", b"Upgrade: h2c", b"TE: trailers",
                            b"Keep-Alive: timeout=5", b"Cookie: session=abc; x=1",
                            b"Proxy-Authorization: Basic eDp5", b"Forwarded: for=1.2.3.4",
                            b"X-Forwarded-For: 10.0.0.1", b"anthropic-version: 2023-06-01",
                            b"Accept-Encoding: gzip, br", b"x-fuzz-latin1: \xe9t\xe9",
                            b"x-fuzz-ctl: a\x01b", b"Bad Header: x", b": empty-name"))
            )  # fmt: skip
        return headers, tuple(client_ids)

    def _model(self) -> Any:
        return self.rng.choice(MODELS)

    def _text(self) -> str:
        return self.rng.choice(TEXTS)

    def _messages(self) -> list[Any]:
        rng = self.rng
        roles = ("user",) * 4 + ("system", "assistant", "tool", "developer", "robot", "")
        return [{"role": rng.choice(roles), "content": self._text()}
                for _ in range(rng.randint(1, 3))]  # fmt: skip

    def _valid(self, kind: str) -> dict[str, Any]:
        rng = self.rng
        match kind:
            case "chat":
                body: dict[str, Any] = {"model": self._model(), "messages": self._messages()}
                if rng.random() < 0.3:
                    body["max_tokens"] = rng.choice((1, 16, 256, 0, -1, "7", 1.5, 10**6, 10**30))
            case "embeddings":
                body = {"model": "text-embedding-3-small", "input": self._text()}
            case "completions":
                body = {"model": self._model(), "prompt": self._text(), "max_tokens": 16}
            case "responses":
                body = {"model": self._model(), "input": self._text(), "max_output_tokens": 32}
            case "messages":
                body = {"model": "claude-3-5-haiku", "max_tokens": 32, "messages": self._messages()}
            case "moderations":
                body = {"input": self._text()}
            case "audio":
                body = {"model": "tts-1", "input": self._text(), "voice": "alloy"}
            case "admin":
                body = {"name": "fuzz-" + self._text()[:20]}
            case _:
                body = {"purpose": "batch", "input_file_id": "file-abc"}
        if kind in ("chat", "completions", "responses", "messages") and rng.random() < 0.35:
            body["stream"] = True if rng.random() < 0.8 else rng.choice(("true", 1, None))
            if rng.random() < 0.15:
                body["stream_options"] = rng.choice((None, {}, {"include_usage": False}, "x"))
        if rng.random() < 0.1:
            body[rng.choice(("temperature", "top_p", "n", "stop", "tools"))] = self._json(2)
        if rng.random() < 0.1 and body:
            body.pop(rng.choice(sorted(body)))
        return body

    def _json(self, depth: int) -> Any:
        rng = self.rng
        choice = rng.randrange(8 if depth > 0 else 6)
        leaves: list[Any] = [
            None,
            rng.random() < 0.5,
            rng.choice((0, -1, 10**30, 2**63)),
            rng.choice((1e308, -0.0, 0.5)),
            self._text(),
            self._model(),
        ]
        if choice < 6:
            return leaves[choice]
        if choice == 6:
            return [self._json(depth - 1) for _ in range(rng.randint(0, 4))]
        return {self._text()[:10]: self._json(depth - 1) for _ in range(rng.randint(0, 4))}

    def _body(self, kind: str) -> bytes:
        rng = self.rng
        draw = rng.random()
        if kind == "none" and draw < 0.5:
            return b""
        if draw < 0.7:  # ensure_ascii keeps a lone surrogate as the escape "\ud800"
            return json.dumps(self._valid("chat" if kind == "none" else kind)).encode()
        if draw < 0.78:
            return json.dumps(self._json(3)).encode()
        if draw < 0.83:
            return rng.choice((b'{"model": ', b"nul", b"{}", b"[]", b'{"model":"gpt-4o-mini",}',
                               b"\xff\xfe{}", b'{"model":"\xc3"}', b'"\\ud800"', b"{" * 3,
                               b'{"a":1,"a":2}', b"NaN", b'{"model":Infinity}'))  # fmt: skip
        if draw < 0.87:
            return b""
        if draw < 0.91:
            return b'{"model":"gpt-4o-mini","messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        if draw < 0.95:
            padding = "p" * rng.choice((MAX_BODY_BYTES + 1, 100_000, 300_000))
            body = self._valid("chat" if kind == "none" else kind)
            return json.dumps({**body, "padding": padding}).encode()
        raw = json.dumps(self._valid("chat" if kind == "none" else kind), ensure_ascii=False)
        return raw.encode("utf-8", "surrogatepass")

    def _framing(self, body: bytes, method: str) -> tuple[list[bytes], bytes, bool]:
        rng = self.rng
        draw = rng.random()
        if draw < 0.84 or (not body and draw < 0.94):
            if not body and method in ("GET", "HEAD", "OPTIONS") and rng.random() < 0.7:
                return [], b"", False
            return [b"Content-Length: %d" % len(body)], body, False
        if draw < 0.9 or not body:
            cuts = sorted(rng.sample(range(1, len(body)), min(3, max(0, len(body) - 1))))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
            return [b"Transfer-Encoding: chunked"], chunks + b"0\r\n\r\n", False
        if draw < 0.93:  # shorter than the body: the rest reads as a second, broken request
            return [b"Content-Length: %d" % rng.randrange(len(body))], body, False
        if draw < 0.96:
            return [b"Content-Length: %d" % (len(body) + rng.randint(1, 5000))], body, True
        if draw < 0.98:
            return (
                [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"],
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                False,
            )
        if draw < 0.99:
            return [b"Transfer-Encoding: chunked"], b"zz\r\n" + body + b"\r\n0\r\n\r\n", False
        lengths = [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
        return lengths, body, False


@dataclass(slots=True)
class Answer:
    """What a client saw for one case."""

    case: Case
    kind: str  # response | closed | http_layer | incomplete | timeout
    status: int = 0
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def describe(self) -> str:
        return f"{self.kind} {self.status} {self.body[:200]!r} <- {self.case.describe()}"


def _dechunk(data: bytes) -> bytes | None:
    """A chunked body, or None when it is cut short or malformed."""
    out: list[bytes] = []
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(data[pos:eol].split(b";")[0], 16)
        except ValueError:
            return None
        pos = eol + 2
        if size == 0:
            return b"".join(out)
        if len(data) < pos + size + 2:
            return None
        out.append(data[pos : pos + size])
        pos += size + 2


def parse(case: Case, raw: bytes) -> Answer:
    """The first final response in `raw` (a 100 Continue is skipped)."""
    if not raw:
        return Answer(case, "closed")
    while True:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return Answer(case, "incomplete", body=raw)
        lines = raw[:end].split(b"\r\n")
        raw = raw[end + 4 :]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return Answer(case, "incomplete", body=lines[0])
        status = int(parts[1])
        if status >= 200:
            break
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(
            value.strip().decode("latin-1")
        )
    answer = Answer(case, "response", status, headers)
    if "x-request-id" not in headers and raw.startswith(HTTP_LAYER_400):
        return Answer(case, "http_layer", status, headers, raw)
    length = answer.header("content-length")
    if case.method == "HEAD" or status in (204, 304):
        return answer
    if "chunked" in (answer.header("transfer-encoding") or ""):
        body = _dechunk(raw)
        if body is None:
            answer.kind, answer.body = "incomplete", raw[-200:]
            return answer
        answer.body = body
    elif length is not None:
        answer.body = raw[: int(length)]
        if len(raw) < int(length):
            answer.kind = "incomplete"
    else:
        answer.body = raw
    return answer


def send(case: Case, port: int, deadline: float) -> Answer | None:
    """One case over its own connection; None when the run's time is up."""
    if time.monotonic() > deadline:
        return None
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        try:
            sock.sendall(case.wire())
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer (413, 400) and close before reading it all
            pass
        until = time.monotonic() + READ_TIMEOUT_S
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return Answer(case, "timeout", body=bytes(received[:200]))
            except OSError:
                break
            if not data:
                break
            received += data
            if time.monotonic() > until:
                return Answer(case, "timeout", body=bytes(received[:200]))
    return parse(case, bytes(received))


@dataclass
class FuzzRun:
    seed: int
    answers: list[Answer]
    received: list[dict[str, Any]]  # what the mock upstream saw (not its model-list fetches)
    records: list[dict[str, Any]]
    alive: bool
    healthz: int | None
    log: str
    elapsed_s: float

    def check(self, what: str, failures: list[str]) -> None:
        if failures:
            shown = "\n  ".join(failures[:12])
            more = f"\n  … and {len(failures) - 12} more" if len(failures) > 12 else ""
            pytest.fail(
                f"{what}: {len(failures)} case(s)\n  {shown}{more}\n{self.reproduce()}",
                pytrace=False,
            )

    def reproduce(self) -> str:
        kinds = Counter(a.kind for a in self.answers)
        statuses = Counter(a.status for a in self.answers if a.kind == "response")
        return (
            f"fuzz seed {self.seed}: {len(self.answers)} requests in {self.elapsed_s:.1f} s, "
            f"{dict(kinds)}, statuses {dict(sorted(statuses.items()))}, "
            f"{len(self.received)} upstream requests, {len(self.records)} records; "
            "reproduce with "
            f"TOLLGATE_FUZZ_SEED={self.seed} TOLLGATE_FUZZ_REQUESTS={REQUESTS} "
            f".venv/bin/pytest tests/integration/test_fuzz.py"
        )

    def response_ids(self) -> dict[str, Answer]:
        return {i: a for a in self.answers if (i := a.header("x-request-id")) is not None}


@pytest.fixture(scope="module")
def fuzz_stack(
    redis_store: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """This module's own mock upstream, so what it received is the fuzz's alone."""
    with running_mock() as mock:
        spool = tmp_path_factory.mktemp("spool-fuzz")
        with running_stack(redis_store, mock, spool, **SETTINGS) as stack:
            yield stack


@pytest.fixture(scope="module")
def fuzz(fuzz_stack: Stack) -> FuzzRun:
    stack = fuzz_stack
    since = time.time()
    limits = {"rpm": 10**7, "tpm": 10**10, "max_concurrency": 64, "credits": 1000}
    valid = stack.admin.create_key(name="fuzz-valid", **limits)
    revoked = stack.admin.create_key(name="fuzz-revoked", **limits)
    assert stack.admin.client.delete(f"/admin/keys/{revoked['id']}").status_code == 200
    fuzzer = Fuzzer(
        random.Random(SEED),
        port=stack.proxy.port,
        valid_key=valid["key"],
        revoked_key=revoked["key"],
    )
    cases = [fuzzer.case(i) for i in range(REQUESTS)]
    print(f"fuzz seed {SEED}, {REQUESTS} requests")
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        sent = pool.map(lambda c: send(c, stack.proxy.port, started + SECONDS), cases)
        answers = [a for a in sent if a is not None]
    elapsed_s = time.monotonic() - started
    key_ids = {valid["id"], revoked["id"]}
    records: list[dict[str, Any]] = []
    received: list[dict[str, Any]] = []

    def settled() -> bool:
        """Every upstream request has its record, and no request is still arriving upstream
        (a client cut off early does not stop its request)."""
        before = len(received)
        received[:] = stack.mock.received()
        records[:] = [r for r in stack.admin.export(since=since) if r["key_id"] in key_ids]
        ids = {r["request_id"] for r in records}
        landed = all(r["headers"].get("x-request-id") in ids for r in received)
        return landed and len(received) == before

    # Streams settle just after their last byte; a record still missing shows in the checks.
    with contextlib.suppress(TimeoutError):
        wait_for(settled, timeout_s=10, what="fuzz usage records")
    process = stack.proxy.process
    try:
        healthz: int | None = httpx.get(stack.url + "/healthz", timeout=5).status_code
    except httpx.HTTPError:
        healthz = None
    return FuzzRun(
        seed=SEED,
        answers=answers,
        received=received,
        records=records,
        alive=process is not None and process.poll() is None,
        healthz=healthz,
        log=stack.proxy.output(),
        elapsed_s=elapsed_s,
    )


def _is_error_json(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def test_fuzzed_requests_get_complete_answers_and_never_a_500(fuzz: FuzzRun) -> None:
    upstream_ids = {r["headers"].get("x-request-id") for r in fuzz.received}
    failures = []
    for answer in fuzz.answers:
        if answer.kind in ("incomplete", "timeout"):
            failures.append(answer.describe())
        elif answer.kind == "response" and answer.status >= 500:
            if answer.status not in (502, 503, 504):
                failures.append(answer.describe())
        elif (
            answer.kind == "response"
            and answer.status >= 400
            and answer.case.method != "HEAD"
            # An upstream 4xx comes back as the upstream wrote it; Tollgate's own are JSON.
            and answer.header("x-request-id") not in upstream_ids
            and not _is_error_json(answer.body)
        ):
            failures.append(answer.describe())
    fuzz.check("answers that are cut short, 500s or errors that are not JSON", failures)


def test_fuzzed_requests_are_mostly_answered_above_the_http_layer(fuzz: FuzzRun) -> None:
    refused = [a for a in fuzz.answers if a.kind in ("closed", "http_layer")]
    assert len(fuzz.answers) >= min(REQUESTS, 100), fuzz.reproduce()
    assert len(refused) * 2 < len(fuzz.answers), fuzz.reproduce()


def _unhandled(log: str) -> list[str]:
    """The exceptions of the proxy's logged tracebacks, counted, each with its first log line."""
    seen: Counter[str] = Counter()
    first: dict[str, str] = {}
    lines = log.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((i for i in range(number + 1, len(lines)) if not lines[i][:1].isspace()), -1)
            seen[lines[end][:200]] += 1
            first.setdefault(lines[end][:200], lines[number - 1][:160])
    return [f"{n}x {error} (first: {first[error]})" for error, n in seen.items()]


def test_proxy_survives_the_fuzz_and_logs_no_unhandled_error(fuzz: FuzzRun) -> None:
    assert fuzz.alive and fuzz.healthz == 200, fuzz.reproduce()
    fuzz.check("unhandled errors in the proxy log", _unhandled(fuzz.log))


def test_every_upstream_request_was_admitted_and_has_one_usage_record(fuzz: FuzzRun) -> None:
    by_id = Counter(r["request_id"] for r in fuzz.records)
    answers = fuzz.response_ids()
    failures = [f"usage record id {i!r} appears {n} times" for i, n in by_id.items() if n > 1]
    sent = Counter(r["headers"].get("x-request-id") for r in fuzz.received)
    client_ids = {i for a in fuzz.answers for i in a.case.client_ids}
    for received in fuzz.received:
        request_id = received["headers"].get("x-request-id")
        answer = answers.get(request_id or "")
        seen = f"{received['method']} {received['raw_path'][:120]} (id {request_id!r}) <- " + (
            answer.describe() if answer else "no client answer with that id"
        )
        if request_id is None or request_id in client_ids:
            failures.append("upstream request without an id of Tollgate's: " + seen)
        elif sent[request_id] > 1:
            failures.append(f"upstream saw id {request_id!r} {sent[request_id]} times: " + seen)
        elif by_id[request_id] != 1:
            failures.append(f"{by_id[request_id]} usage records for upstream request " + seen)
    upstream_ids = set(sent)
    # A request that died on the way (a keep-alive connection the upstream closed as it was
    # written, say) is a 502 or 504 with a record and may never have reached the upstream.
    unsent = [r for r in fuzz.records if r["request_id"] not in upstream_ids]
    for record in unsent:
        if record["status"] not in (502, 504):
            answer = answers.get(record["request_id"])
            failures.append(
                f"usage record {record['request_id']!r} (status {record['status']}) for a "
                "request the upstream never saw <- "
                + (answer.describe() if answer else "no client answer with that id")
            )
    if len(fuzz.received) != len(fuzz.records) - len(unsent):
        failures.append(
            f"{len(fuzz.received)} upstream requests but "
            f"{len(fuzz.records) - len(unsent)} records of requests that reached it"
        )
    fuzz.check("upstream requests without exactly one usage record", failures)


def test_upstream_only_receives_forwardable_paths(fuzz: FuzzRun) -> None:
    answers = fuzz.response_ids()
    failures = []
    for received in fuzz.received:
        path = received["raw_path"]
        segments = [unquote(s) for s in path.split("/")[1:]]
        if (
            not FORWARDABLE.fullmatch(path)
            or any(s in (".", "..") for s in segments)
            or any(m in path.lower() for m in SMUGGLED)
        ):
            answer = answers.get(received["headers"].get("x-request-id") or "")
            failures.append(
                f"{received['method']} {path[:160]!r}?{received['query'][:40]!r} <- "
                + (answer.describe() if answer else "no client answer with that id")
            )
    fuzz.check("upstream paths Tollgate must not forward", failures)


def test_every_response_carries_a_fresh_tollgate_request_id(fuzz: FuzzRun) -> None:
    client_ids = {i for a in fuzz.answers for i in a.case.client_ids}
    seen: Counter[str] = Counter()
    failures = []
    for answer in fuzz.answers:
        if answer.kind not in ("response", "incomplete") or answer.status == 0:
            continue
        ids = answer.headers.get("x-request-id", [])
        if len(ids) != 1:
            failures.append(f"{len(ids)} x-request-id headers: " + answer.describe())
            continue
        seen[ids[0]] += 1
        if ids[0] in client_ids:
            failures.append(f"x-request-id {ids[0]!r} is a client's: " + answer.describe())
    failures += [f"x-request-id {i!r} on {n} responses" for i, n in seen.items() if n > 1]
    fuzz.check("responses without a fresh x-request-id of Tollgate's", failures)
