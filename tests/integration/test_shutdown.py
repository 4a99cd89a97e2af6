"""Graceful shutdown of a real `tollgate serve`: on SIGTERM it stops accepting, lets streams
in flight finish within TOLLGATE_SHUTDOWN_TIMEOUT, settles every one of them (a usage record
each, also for a stream cut off at the timeout) and exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from proxy.mock_upstream import REPLY
from proxy.store import usage_key
from tests.admin_client import Admin
from tests.servers import (
    ProxyServer,
    RedisServer,
    mock_upstream_server,
    proxy_server,
    redis_server,
    tollgate_env,
    wait_for,
)


@dataclass
class Stream:
    """A streaming chat completion read in a background thread."""

    request_id: str
    lines: list[str] = field(default_factory=list)
    error: BaseException | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def events(self) -> list[str]:
        return [line.removeprefix("data: ") for line in self.lines if line.startswith("data: ")]

    def content(self) -> str:
        chunks = [json.loads(event) for event in self.events if event != "[DONE]"]
        return "".join(
            choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
        )


def _start_stream(url: str, secret: str, model: str, request_id: str) -> Stream:
    stream = Stream(request_id)

    def read() -> None:
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        headers = {"authorization": f"Bearer {secret}", "x-request-id": request_id}
        try:
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=40
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    stream.lines.append(line)
                    stream.first_chunk.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            stream.error = exc
        finally:
            stream.first_chunk.set()
            stream.ended.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


@pytest.fixture(scope="module")
def store() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The mock upstream's base URL."""
    with mock_upstream_server() as url:
        yield url


def _env(store: RedisServer, upstream: str, spool: Path, timeout_s: int) -> Mapping[str, str]:
    return tollgate_env(
        redis_url=store.url,
        upstream_url=upstream,
        spool_dir=spool,
        TOLLGATE_SHUTDOWN_TIMEOUT=str(timeout_s),
    )


def _refuses_new_requests(proxy: ProxyServer) -> bool:
    try:
        response = httpx.get(f"{proxy.url}/healthz", timeout=0.5)
    except httpx.TransportError:
        return True
    return response.status_code >= 500


def _usage_records(store: RedisServer, key_id: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(store.url, decode_responses=True) as client:
        entries = client.xrange(usage_key(key_id))
    return [json.loads(fields["r"]) for _, fields in entries]


def _exit_code(proxy: ProxyServer, timeout_s: float) -> tuple[int, float]:
    """(exit status, seconds it took) of the proxy, which must exit within `timeout_s`."""
    assert proxy.process is not None
    started = time.monotonic()
    code = proxy.process.wait(timeout=timeout_s)
    return code, time.monotonic() - started


def test_sigterm_lets_a_stream_finish_refuses_new_requests_and_exits_0(
    store: RedisServer, upstream: str, tmp_path: Path
) -> None:
    with proxy_server(env=_env(store, upstream, tmp_path / "spool", 30)) as proxy:
        with Admin(proxy.url) as admin:
            key = admin.create_key(name="shutdown-drain")
        # mock-slow: 0.2 s per chunk, about 2.6 s for the whole answer.
        stream = _start_stream(proxy.url, key["key"], "mock-slow", "shutdown-drain-1")
        assert stream.first_chunk.wait(10) and stream.error is None, stream.error
        proxy.signal(signal.SIGTERM)

        wait_for(lambda: _refuses_new_requests(proxy), timeout_s=3, what="new requests refused")
        assert not stream.ended.is_set(), "the stream must still be draining when new ones fail"
        code, took_s = _exit_code(proxy, timeout_s=30)
        assert code == 0, proxy.output()
        assert took_s < 15, took_s  # the stream's own length, not the 30 s timeout

        assert stream.ended.wait(5)
        assert stream.error is None, stream.error
        assert stream.events[-1] == "[DONE]", stream.lines
        assert stream.content() == REPLY
        usage = json.loads(stream.events[-2])["usage"]

    (record,) = _usage_records(store, key["id"])
    assert record["client_request_id"] == "shutdown-drain-1"
    assert record["usage_source"] == "upstream"
    assert record["status"] == 200
    assert record["stream"] is True
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_stream_outliving_the_shutdown_timeout_is_cut_off_and_still_metered_once(
    store: RedisServer, upstream: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    with proxy_server(env=_env(store, upstream, spool, 1)) as proxy:
        with Admin(proxy.url) as admin:
            key = admin.create_key(name="shutdown-abandoned")
        # mock-gated: after its first chunk the upstream waits for a release that never comes.
        stream = _start_stream(proxy.url, key["key"], "mock-gated", "shutdown-abandoned-1")
        assert stream.first_chunk.wait(10) and stream.error is None, stream.error
        proxy.signal(signal.SIGTERM)

        code, took_s = _exit_code(proxy, timeout_s=15)
        assert code == 0, proxy.output()
        assert took_s < 6, took_s  # 1 s of grace, then the stream is cancelled and settled
        assert stream.ended.wait(5)
        assert "[DONE]" not in stream.events
        # The client is told why: one final error event.
        error = json.loads(stream.events[-1])["error"]
        assert error["type"] == "service_unavailable"

    (record,) = _usage_records(store, key["id"])
    assert record["client_request_id"] == "shutdown-abandoned-1"
    assert record["usage_source"] == "estimated"
    assert record["status"] == 503
    assert record["stream"] is True
    assert record["prompt_tokens"] > 0
    # Settled in Redis before the store was closed, not left in the spool for a later start.
    assert not any(path.is_file() for path in spool.rglob("*"))
