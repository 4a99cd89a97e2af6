"""nginx for the HTTP benchmark: the fast mock upstream and the reference reverse proxy.

Each runs in the foreground (`daemon off`) from a generated config in its own directory and in
its own process group, so stopping it also stops its worker even after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, wait_for

STREAM_HEADER = "X-Bench-Stream"  # the mock upstream answers with SSE when a request has it
STREAM_PATH_PREFIX = "/stream"  # ... or when its path starts with this (for proxies that
# forward no client header)
CONTENT_CHUNKS = 20
_ID = "chatcmpl-bench0123456789"
_CREATED = 1764000000
_MODEL = "gpt-4o-mini"
_USAGE = {"prompt_tokens": 39, "completion_tokens": CONTENT_CHUNKS, "total_tokens": 39 + 20}


def completion_body() -> bytes:
    """The static non-streaming answer: a chat.completion with usage."""
    body = {
        "id": _ID, "object": "chat.completion", "created": _CREATED, "model": _MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hamlet avenges his father; all die.",
                        "refusal": None},
            "logprobs": None, "finish_reason": "stop",
        }],
        "usage": _USAGE,
    }  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def stream_events() -> list[bytes]:
    """The static streaming answer: CONTENT_CHUNKS chunks, a usage chunk, then [DONE]."""
    events: list[bytes] = []
    for index in range(CONTENT_CHUNKS):
        delta = {"role": "assistant", "content": ""} if index == 0 else {"content": f"w{index} "}
        last = index == CONTENT_CHUNKS - 1
        chunk = {
            "id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": _MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": {} if last else delta, "logprobs": None,
                         "finish_reason": "stop" if last else None}],
            "usage": None,
        }  # fmt: skip
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    usage = {
        "id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": _MODEL,
        "system_fingerprint": "fp_bench", "choices": [], "usage": _USAGE,
    }  # fmt: skip
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


_RESPONSE_ID = "resp_bench0123456789"
_ITEM_ID = "msg_bench0123456789"
_RESPONSES_USAGE = {
    "input_tokens": 39, "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": CONTENT_CHUNKS, "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 39 + CONTENT_CHUNKS,
}  # fmt: skip


def _sse_event(payload: dict[str, object]) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode()
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + data + b"\n\n"


def responses_stream_events() -> list[bytes]:
    """The static Responses stream: `response.created`, CONTENT_CHUNKS
    `response.output_text.delta` events, then `response.completed` with the whole response and
    its usage (as many events as the chat stream has chunks)."""
    response: dict[str, object] = {
        "id": _RESPONSE_ID, "object": "response", "created_at": _CREATED, "status": "in_progress",
        "error": None, "incomplete_details": None, "model": _MODEL, "output": [],
        "max_output_tokens": 64, "temperature": 0.2, "top_p": 1.0, "tools": [],
        "tool_choice": "auto", "parallel_tool_calls": True, "usage": None,
    }  # fmt: skip
    events = [_sse_event({"type": "response.created", "sequence_number": 0, "response": response})]
    words = [f"w{index} " for index in range(CONTENT_CHUNKS)]
    for index, word in enumerate(words):
        events.append(_sse_event({
            "type": "response.output_text.delta", "sequence_number": index + 1,
            "item_id": _ITEM_ID, "output_index": 0, "content_index": 0, "delta": word,
            "logprobs": [],
        }))  # fmt: skip
    message = {
        "id": _ITEM_ID, "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "".join(words), "annotations": []}],
    }  # fmt: skip
    completed = {**response, "status": "completed", "output": [message], "usage": _RESPONSES_USAGE}
    events.append(_sse_event({
        "type": "response.completed", "sequence_number": CONTENT_CHUNKS + 1, "response": completed,
    }))  # fmt: skip
    return events


_MESSAGE_ID = "msg_01Bench0123456789"
_ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"


def messages_stream_events() -> list[bytes]:
    """The static Anthropic Messages stream: `message_start` with the input tokens,
    `content_block_start`, CONTENT_CHUNKS `content_block_delta` text deltas,
    `content_block_stop`, `message_delta` with the output tokens, then `message_stop`."""
    message: dict[str, object] = {
        "id": _MESSAGE_ID, "type": "message", "role": "assistant", "content": [],
        "model": _ANTHROPIC_MODEL, "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 39, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1},
    }  # fmt: skip
    events = [
        _sse_event({"type": "message_start", "message": message}),
        _sse_event({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
    ]  # fmt: skip
    for index in range(CONTENT_CHUNKS):
        events.append(_sse_event({
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": f"w{index} "},
        }))  # fmt: skip
    events.append(_sse_event({"type": "content_block_stop", "index": 0}))
    events.append(_sse_event({
        "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": CONTENT_CHUNKS},
    }))  # fmt: skip
    events.append(_sse_event({"type": "message_stop"}))
    return events


def _quoted(text: bytes) -> str:
    """An nginx single-quoted string; `$` would start a variable, so it must not occur."""
    value = text.decode()
    assert "$" not in value, "a $ in a mock body would be read as an nginx variable"
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _main(directory: Path, servers: str) -> str:
    # Temp paths inside the run's directory; a request body this small never touches them.
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{temp}
{servers}
}}
"""


def _sse_return(events: list[bytes]) -> str:
    """A location's body that returns these events as one SSE answer."""
    # One `set` per event: a config token may not exceed nginx's 4 KiB parse buffer.
    sets = "\n".join(f"            set $e{i} {_quoted(e)};" for i, e in enumerate(events))
    joined = "".join(f"$e{i}" for i in range(len(events)))
    return f"""            default_type text/event-stream;
{sets}
            return 200 '{joined}';"""


def upstream_config(directory: Path, port: int) -> str:
    """The mock upstream: a chat.completion, or the SSE stream when asked for one; on
    /v1/responses, always the Responses stream; on /v1/messages, always the Anthropic stream."""
    header = "$http_" + STREAM_HEADER.lower().replace("-", "_")
    servers = f"""    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /v1/chat/completions {{
            if ({header}) {{ rewrite ^ /_stream last; }}
            default_type application/json;
            return 200 {_quoted(completion_body())};
        }}
        location = {STREAM_PATH_PREFIX}/v1/chat/completions {{ rewrite ^ /_stream last; }}
        location = /_stream {{
            internal;
{_sse_return(stream_events())}
        }}
        location = /v1/responses {{
{_sse_return(responses_stream_events())}
        }}
        location = /v1/messages {{
{_sse_return(messages_stream_events())}
        }}
    }}"""
    return _main(directory, servers)


def reverse_proxy_config(directory: Path, port: int, upstream_port: int) -> str:
    """nginx as a plain reverse proxy with a keepalive pool, unbuffered so SSE flows through."""
    servers = f"""    upstream mock {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""
    return _main(directory, servers)


@dataclass(frozen=True, slots=True)
class Nginx:
    port: int
    pid: int  # the master; its worker is its child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


@contextmanager
def nginx_server(
    directory: Path, *, upstream_port: int | None = None, binary: str | None = None
) -> Iterator[Nginx]:
    """The mock upstream, or (with `upstream_port`) the reverse proxy in front of it."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # an unprivileged worker must reach its temp paths
    port = free_port()
    config = (
        upstream_config(directory, port)
        if upstream_port is None
        else reverse_proxy_config(directory, port, upstream_port)
    )
    conf = directory / "nginx.conf"
    conf.write_text(config, encoding="utf-8")
    log = (directory / "stderr.txt").open("wb")
    process = subprocess.Popen(
        [binary or nginx_binary(), "-p", str(directory), "-c", str(conf),
         "-e", str(directory / "error.log")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:

        def ready() -> bool:
            if process.poll() is not None:
                errors = (directory / "error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx exited with {process.returncode}:\n{errors}")
            return _answers(port)

        wait_for(ready, timeout_s=15, what=f"nginx on {port}")
        yield Nginx(port=port, pid=process.pid)
    finally:
        _stop_group(process)
        log.close()


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (fast shutdown) to the master, then SIGKILL to the whole group it leads."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)
