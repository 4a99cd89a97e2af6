"""The store when Redis stalls, backs up or is full, on a real redis-server: only overdue calls
fail, they fail as StoreDown, few of them had run, and Limiter.release undoes those that had."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy import store as keys_of
from proxy.keys import Keyring, PresentedKey, parse_key
from proxy.limits import Limiter
from proxy.redis_mux import RedisMux
from proxy.store import REDIS_TIMEOUT_S, Store, StoreDown
from tests.servers import RedisServer, redis_server

pytestmark = pytest.mark.anyio
LEASE_MS = 60_000
# Executes for about a millisecond, then leaves a marker: which calls reported failed had run.
BUSY_SCRIPT = """
local t = redis.call('TIME')
local until_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= until_us
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    key_id: str
    started: float  # monotonic seconds
    elapsed_s: float
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class AdmittedKey:
    key_id: str
    presented: PresentedKey


async def new_keys(store: Store, count: int) -> list[AdmittedKey]:
    keys = []
    for _ in range(count):
        record = await Keyring(store).create(
            name="failures", limits={}, credits_micros=None, allowed_models=None, metadata={}
        )
        presented = parse_key(record["key"])
        assert presented is not None
        keys.append(AdmittedKey(record["id"], presented))
    return keys


async def admissions(
    limiter: Limiter, keys: list[AdmittedKey], *, rate_per_s: float, duration_s: float
) -> list[Outcome]:
    """Admissions arriving at `rate_per_s` for `duration_s`, round-robin over `keys`; every
    outcome, failed or not (a failure other than StoreDown is kept, for the test to see)."""
    outcomes: list[Outcome] = []

    async def one(key: AdmittedKey) -> None:
        request_id = secrets.token_hex(8)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            decision = await limiter.admit(
                key.presented, request_id=request_id, model="m", token_estimate=10, cost_micros=0
            )
            assert decision.admitted, decision
        except Exception as exc:  # kept: the test asserts which ones
            error = exc
        outcomes.append(Outcome(request_id, key.key_id, started, time.monotonic() - started, error))

    tasks = []
    begin = time.monotonic()
    issued = 0
    while (now := time.monotonic()) - begin < duration_s:
        due = int((now - begin) * rate_per_s)
        for _ in range(due - issued):
            tasks.append(asyncio.ensure_future(one(keys[issued % len(keys)])))
            issued += 1
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    return outcomes


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    others = [o.error for o in outcomes if o.error and not isinstance(o.error, StoreDown)]
    assert others == [], others[:3]
    return [o for o in outcomes if o.error is not None]


async def still_admitted(store: Store, outcomes: list[Outcome]) -> list[Outcome]:
    """Those whose admission is in the store: an in-flight entry or a reservation."""
    held = []
    for o in outcomes:
        lease = await store.client.zscore(keys_of.inflight_key(o.key_id), o.request_id)
        reserved = await store.client.hexists(keys_of.reserved_key(o.key_id), o.request_id)
        if lease is not None or reserved:
            held.append(o)
    return held


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as own:  # stalled and filled up: not the shared one
        yield own


@asynccontextmanager
async def _store(server: RedisServer, *, shared: bool) -> AsyncIterator[Store]:
    timeouts = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
    client: Any = aioredis.Redis.from_url(server.url, decode_responses=True, **timeouts)
    mux = None
    if shared:
        mux = RedisMux(server.url, timeout_s=REDIS_TIMEOUT_S, connect_timeout_s=REDIS_TIMEOUT_S)
    the_store = Store(client, mux=mux)
    try:
        yield the_store
    finally:
        await the_store.aclose()


@pytest.fixture(params=["mux", "redis-py"])
async def store(request: pytest.FixtureRequest, server: RedisServer) -> AsyncIterator[Store]:
    async with _store(server, shared=request.param == "mux") as the_store:
        yield the_store


@pytest.fixture
async def shared_store(server: RedisServer) -> AsyncIterator[Store]:
    """The shared connection only: redis-py's pool of 64 connections is its own queue."""
    async with _store(server, shared=True) as the_store:
        yield the_store


async def test_a_stall_fails_only_overdue_calls_and_those_that_ran_are_released(
    server: RedisServer, store: Store
) -> None:
    limiter = Limiter(store, lease_ms=LEASE_MS)
    keys = await new_keys(store, 16)
    staller: Any = aioredis.Redis.from_url(server.url)

    async def stall() -> None:
        await asyncio.sleep(1.0)
        await staller.execute_command("DEBUG", "SLEEP", "2.5")

    try:
        stalled = asyncio.ensure_future(stall())
        outcomes = await admissions(limiter, keys, rate_per_s=850, duration_s=5.0)
        await stalled
    finally:
        await staller.aclose()
    failed = failures(outcomes)
    ran = await still_admitted(store, failed)
    print(
        f"\n{'mux' if store.mux else 'redis-py'}: stall of 2.5 s at 850 calls/s: "
        f"{len(outcomes)} calls, {len(failed)} failed, {len(ran)} of those had run"
    )
    assert failed, "the stall should have made some calls overdue"
    if store.mux is not None:  # redis-py's pool fails a call after a 2 s read on its connection
        assert all(o.elapsed_s >= REDIS_TIMEOUT_S - 0.05 for o in failed)  # none failed early
        assert len(ran) <= 150
    assert all(o.elapsed_s <= REDIS_TIMEOUT_S + 1.0 for o in failed)
    # The proxy releases every admission that raised StoreDown: those that ran come back.
    released = [await limiter.release(o.key_id, o.request_id) for o in failed]
    assert sum(released) == len(ran)
    assert await still_admitted(store, failed) == []


async def test_a_backlog_fails_only_calls_that_waited_past_their_deadline(
    server: RedisServer, shared_store: Store
) -> None:
    store = shared_store
    script = store.client.register_script(BUSY_SCRIPT)
    marker = "failures:ran:{backlog}"

    async def one(i: int) -> tuple[str, float, BaseException | None]:
        started = time.monotonic()
        try:
            await store.run(script, [marker], [f"c{i}"])
        except StoreDown as exc:
            return f"c{i}", time.monotonic() - started, exc
        return f"c{i}", time.monotonic() - started, None

    results = await asyncio.gather(*(one(i) for i in range(4000)))
    failed = [(name, elapsed) for name, elapsed, error in results if error is not None]
    ran = [name for name, _ in failed if await store.client.sismember(marker, name)]
    print(f"\nbacklog of 4,000 calls of ~1 ms: {len(failed)} failed, {len(ran)} of those had run")
    assert all(elapsed >= REDIS_TIMEOUT_S - 0.05 for _, elapsed in failed)
    assert len(ran) <= 250


async def test_max_clients_reached_is_store_down_then_recovers(
    server: RedisServer, store: Store
) -> None:
    limiter = Limiter(store, lease_ms=LEASE_MS)
    keys = await new_keys(store, 1)
    await store.aclose()  # every connection of this store is closed; the next call reconnects
    server.cli("CONFIG", "SET", "maxclients", "4")
    hogs = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        for hog in hogs:
            hog.sendall(b"PING\r\n")
            assert hog.recv(16) == b"+PONG\r\n"
        with pytest.raises(StoreDown) as refused:
            await limiter.admit(
                keys[0].presented, request_id="full", model="m", token_estimate=1, cost_micros=0
            )
        print(f"\n{'mux' if store.mux else 'redis-py'}: maxclients reached: {refused.value}")
        with pytest.raises(StoreDown):
            await store.call(lambda: store.client.get("anything"))
    finally:
        for hog in hogs:
            hog.close()
    await asyncio.sleep(0.1)
    decision = await limiter.admit(
        keys[0].presented, request_id="room", model="m", token_estimate=1, cost_micros=0
    )
    assert decision.admitted
