"""The hot path's shared Redis connection against a real redis-server: replies reach the right
callers, a cancelled or overdue caller does not shift anyone's reply, only overdue calls fail,
a stall holds calls in the client, a silent Redis times out, and a restarted or full one is
reconnected to."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from proxy.config import load_settings
from proxy.keys import new_key, parse_key
from proxy.limits import Limiter
from proxy.redis_mux import MAX_IN_FLIGHT, ClusterMux, RedisMux
from proxy.store import Store, StoreDown, open_store
from tests.servers import (
    RedisServer,
    _port_open,
    free_port,
    redis_server,
    self_signed_certificate,
    wait_for,
)

pytestmark = pytest.mark.anyio
SCRIPT = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}"


def mux(url: str, timeout_s: float = 2.0) -> RedisMux:
    return RedisMux(url, timeout_s=timeout_s, connect_timeout_s=2.0)


async def test_concurrent_calls_each_get_their_own_reply(real_redis: RedisServer) -> None:
    connection = mux(real_redis.url)
    try:
        replies = await asyncio.gather(*(connection.execute("ECHO", f"r{i}") for i in range(300)))
        assert replies == [f"r{i}" for i in range(300)]
        assert await connection.execute("INCRBY", "mux:counter", 5) >= 5
        assert await connection.execute("GET", "mux:absent") is None
    finally:
        await connection.aclose()


async def test_a_script_redis_forgot_is_loaded_again(real_redis: RedisServer) -> None:
    client: Any = redis.asyncio.Redis.from_url(real_redis.url, decode_responses=True)
    script = client.register_script(SCRIPT)
    connection = mux(real_redis.url)
    try:
        real_redis.cli("SCRIPT", "FLUSH")
        reply = await connection.evalsha(script.sha, script.script, ["{k}a"], ["x", 41])
        assert reply == ["{k}a", "x", 42]
        assert real_redis.cli("SCRIPT", "EXISTS", script.sha) == "1"
    finally:
        await connection.aclose()
        await client.aclose()


async def test_an_error_reply_is_raised_and_the_connection_stays_usable(
    real_redis: RedisServer,
) -> None:
    connection = mux(real_redis.url)
    try:
        await connection.execute("SET", "mux:text", "abc")
        with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
            await connection.execute("INCR", "mux:text")
        assert await connection.execute("ECHO", "still here") == "still here"
    finally:
        await connection.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(real_redis: RedisServer) -> None:
    connection = mux(real_redis.url)
    try:
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "mux:never", "0.3"))
        await asyncio.sleep(0.05)
        blocked.cancel()
        # Sent after BLPOP on the same connection: its reply arrives second and must not be
        # handed BLPOP's.
        assert await connection.execute("ECHO", "mine") == "mine"
        assert blocked.cancelled()
    finally:
        await connection.aclose()


async def test_each_overdue_call_fails_alone_and_late_replies_are_skipped(
    real_redis: RedisServer,
) -> None:
    connection = mux(real_redis.url, timeout_s=0.3)
    try:
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "mux:never", "0.6"))
        behind = asyncio.ensure_future(connection.execute("ECHO", "behind it"))
        await asyncio.sleep(0.2)
        # Issued while BLPOP holds the connection: it waits in the client, is written when
        # BLPOP's reply comes (at 0.6 s, before its own deadline) and gets its own reply.
        later = asyncio.ensure_future(connection.execute("ECHO", "later"))
        results = await asyncio.gather(blocked, behind, return_exceptions=True)
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        with pytest.raises(redis.exceptions.TimeoutError):
            await later  # 0.5 s: still waiting for BLPOP's reply
    finally:
        await connection.aclose()
    connection = mux(real_redis.url, timeout_s=0.5)
    try:
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "mux:never", "0.3"))
        await asyncio.sleep(0.1)
        later = asyncio.ensure_future(connection.execute("ECHO", "later"))
        assert await blocked is None
        assert await later == "later"
    finally:
        await connection.aclose()


async def test_a_silent_redis_fails_calls_at_their_deadline_then_the_connection_is_replaced(
    real_redis: RedisServer,
) -> None:
    connection = RedisMux(real_redis.url, timeout_s=0.3, connect_timeout_s=1.0, silence_s=0.6)
    try:
        started = time.monotonic()
        waiting = [
            asyncio.ensure_future(connection.execute("BLPOP", "mux:never", "5")),
            asyncio.ensure_future(connection.execute("ECHO", "behind it")),
        ]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        assert time.monotonic() - started < 0.6
        await asyncio.sleep(0.5)  # silent for 0.6 s while owing replies: dropped
        assert await connection.execute("ECHO", "again") == "again"
    finally:
        await connection.aclose()


async def test_a_burst_during_a_stall_writes_at_most_the_in_flight_bound(
    real_redis: RedisServer,
) -> None:
    counter = "mux:burst:" + str(time.monotonic_ns())
    connection = mux(real_redis.url, timeout_s=0.3)
    staller: Any = redis.asyncio.Redis.from_url(real_redis.url)
    try:
        await connection.execute("PING")
        stall = asyncio.ensure_future(staller.execute_command("DEBUG", "SLEEP", "0.6"))
        await asyncio.sleep(0.05)
        calls = [connection.execute("INCR", counter) for _ in range(MAX_IN_FLIGHT + 300)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await stall
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results)
        executed = int(await connection.execute("GET", counter))
        print(f"\nburst during a stall: {len(results)} failed, {executed} of them ran")
        assert executed == MAX_IN_FLIGHT  # the rest timed out in the client, never sent
    finally:
        await connection.aclose()
        await staller.aclose()


async def test_a_call_cancelled_before_it_is_written_is_never_sent(
    real_redis: RedisServer,
) -> None:
    counter = "mux:cancelled:" + str(time.monotonic_ns())
    connection = mux(real_redis.url)
    try:
        await connection.execute("PING")
        call = asyncio.ensure_future(connection.execute("INCR", counter))
        await asyncio.sleep(0)  # issued, not yet written
        call.cancel()
        assert await connection.execute("ECHO", "next") == "next"
        assert call.cancelled()
        assert await connection.execute("GET", counter) is None
    finally:
        await connection.aclose()


async def test_an_undecodable_reply_fails_only_its_own_call(real_redis: RedisServer) -> None:
    raw: Any = redis.asyncio.Redis.from_url(real_redis.url)
    connection = mux(real_redis.url)
    try:
        await raw.set("mux:latin1", b"caf\xe9")
        results = await asyncio.gather(
            connection.execute("ECHO", "before"),
            connection.execute("GET", "mux:latin1"),
            connection.execute("ECHO", "after"),
            return_exceptions=True,
        )
        assert results[0] == "before" and results[2] == "after"
        assert isinstance(results[1], redis.exceptions.InvalidResponse)
        assert await connection.execute("ECHO", "still here") == "still here"
    finally:
        await connection.aclose()
        await raw.aclose()


async def test_a_connect_attempt_whose_callers_all_left_does_not_fail_the_next_caller() -> None:
    with redis_server() as server:
        server.cli("CONFIG", "SET", "requirepass", "s3cret")
        connection = RedisMux(
            f"redis://:s3cret@127.0.0.1:{server.port}/0", timeout_s=1.0, connect_timeout_s=0.3
        )
        assert server.process is not None
        try:
            server.process.send_signal(signal.SIGSTOP)  # accepts, never answers AUTH
            first = asyncio.ensure_future(connection.execute("PING"))
            await asyncio.sleep(0.05)
            first.cancel()
            await asyncio.sleep(0.4)  # the attempt times out with nobody waiting
            server.process.send_signal(signal.SIGCONT)
            assert await connection.execute("ECHO", "fresh") == "fresh"
        finally:
            server.process.send_signal(signal.SIGCONT)
            await connection.aclose()


async def test_max_clients_reached_is_a_connection_error_then_connects_again() -> None:
    with redis_server() as server:
        connection = mux(server.url)
        server.cli("CONFIG", "SET", "maxclients", "3")
        hogs = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            for hog in hogs:
                hog.sendall(b"PING\r\n")
                assert hog.recv(16) == b"+PONG\r\n"
            # Redis sends the error and closes: which the client sees first depends on timing.
            with pytest.raises(
                redis.exceptions.ConnectionError, match=r"max number of clients|Connection .* lost"
            ):
                await connection.execute("PING")
        finally:
            for hog in hogs:
                hog.close()
        await asyncio.sleep(0.1)
        try:
            assert await connection.execute("ECHO", "in") == "in"
        finally:
            await connection.aclose()


async def test_a_restarted_redis_is_reconnected_and_the_outage_is_store_down() -> None:
    with redis_server() as server:
        store = Store(
            redis.asyncio.Redis.from_url(server.url, decode_responses=True), mux=mux(server.url)
        )
        limiter = Limiter(store, lease_ms=1000)
        stranger = parse_key(new_key("0123456789abcdef"))
        assert stranger is not None

        async def admit() -> str:
            decision = await limiter.admit(
                stranger, request_id="r1", model="m", token_estimate=1, cost_micros=0
            )
            return decision.verdict

        try:
            assert await admit() == "unknown_key"
            server.stop()
            with pytest.raises(StoreDown):
                await admit()
            server.start()
            assert await admit() == "unknown_key"
        finally:
            await store.aclose()


async def test_password_and_database_from_the_url() -> None:
    with redis_server() as server:
        server.cli("CONFIG", "SET", "requirepass", "s3cret")
        base = f"127.0.0.1:{server.port}"
        connection = mux(f"redis://:s3cret@{base}/3")
        wrong = mux(f"redis://:wrong@{base}/0")
        anonymous = mux(f"redis://{base}/0")
        try:
            await connection.execute("SET", "mux:db", "three")
            out = subprocess.run(
                ["redis-cli", "-p", str(server.port), "-a", "s3cret", "-n", "3", "GET", "mux:db"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert out.stdout.strip() == "three"
            with pytest.raises(redis.exceptions.ConnectionError):
                await wrong.execute("PING")
            with pytest.raises(redis.exceptions.ConnectionError):  # NOAUTH is a store failure
                await anonymous.execute("PING")
        finally:
            for each in (connection, wrong, anonymous):
                await each.aclose()


async def test_unix_socket_url() -> None:
    directory = Path(tempfile.mkdtemp(prefix="tollgate-redis-unix-"))
    socket_path = directory / "redis.sock"
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--save", "",
         "--unixsocket", str(socket_path), "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(socket_path.exists, what="redis unix socket")
        connection = mux(f"unix://{socket_path}?db=2")
        try:
            assert await connection.execute("ECHO", "over unix") == "over unix"
            assert " db=2 " in await connection.execute("CLIENT", "INFO")
        finally:
            await connection.aclose()
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_shared_connections_unless_the_url_needs_redis_py(tmp_path: Path) -> None:
    def store_for(url: str, cluster: bool = False) -> Store:
        env = {"TOLLGATE_REDIS_URL": url, "TOLLGATE_ADMIN_TOKEN": "x" * 32,
               "TOLLGATE_SPOOL_DIR": str(tmp_path)}  # fmt: skip
        if cluster:
            env["TOLLGATE_REDIS_CLUSTER"] = "true"
        return open_store(load_settings(env))

    assert isinstance(store_for("redis://127.0.0.1:6379/0").mux, RedisMux)
    assert isinstance(store_for("unix:///tmp/redis.sock").mux, RedisMux)
    assert isinstance(store_for("redis://127.0.0.1:7000", cluster=True).mux, ClusterMux)
    assert isinstance(store_for("rediss://127.0.0.1:6379/0").mux, RedisMux)
    assert store_for("rediss://127.0.0.1:6379/0?ssl_ciphers=HIGH").mux is None  # redis-py's
    assert store_for("rediss://127.0.0.1:7000?ssl_ciphers=HIGH", cluster=True).mux is None


async def test_cluster_calls_go_to_the_slot_owner_and_follow_moved_themselves(
    real_cluster: list[RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"redis://127.0.0.1:{real_cluster[0].port}"
    client: Any = redis.asyncio.RedisCluster.from_url(url, decode_responses=True)
    script = client.register_script(SCRIPT)
    cluster_mux = ClusterMux(client, url, timeout_s=2.0, connect_timeout_s=2.0)
    through_redis_py: list[tuple[Any, ...]] = []
    monkeypatch.setattr(client, "evalsha", lambda *args: through_redis_py.append(args))
    try:
        tags = [f"{{tag{i}}}x" for i in range(12)]  # spread over the masters
        for tag in tags:
            assert await cluster_mux.evalsha(script.sha, script.script, [tag], ["v", 1]) == [
                tag, "v", 2
            ]  # fmt: skip
        owners = {client.get_node_from_key(tag).name for tag in tags}
        assert set(cluster_mux.nodes) == owners and len(owners) > 1

        # A stale slot map: the wrong master answers MOVED, which is followed here.
        right = client.get_node_from_key(tags[0])
        wrong = next(n for n in client.get_primaries() if n.name != right.name)
        monkeypatch.setattr(client, "get_node_from_key", lambda key, *a, **k: wrong)
        reply = await cluster_mux.evalsha(script.sha, script.script, [tags[0]], ["w", 5])
        assert reply == [tags[0], "w", 6]
        assert through_redis_py == []
    finally:
        await cluster_mux.aclose()
        await client.aclose()


async def test_tls_redis_with_the_url_options(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"rediss://127.0.0.1:{port}/0"
    trusted = mux(f"{base}?ssl_ca_certs={cert}")
    unchecked = mux(f"{base}?ssl_cert_reqs=none")
    untrusted = mux(base)  # the system's trust store does not know this certificate
    try:
        wait_for(lambda: _port_open(port), what="redis TLS port")
        assert await trusted.execute("ECHO", "over tls") == "over tls"
        assert await unchecked.execute("ECHO", "unchecked") == "unchecked"
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING")
    finally:
        for each in (trusted, unchecked, untrusted):
            await each.aclose()
        process.kill()
        process.wait(timeout=10)
    assert RedisMux.supports(f"{base}?ssl_ca_certs={cert}&ssl_cert_reqs=required")
    assert not RedisMux.supports(f"{base}?ssl_ciphers=HIGH")  # left to redis-py
