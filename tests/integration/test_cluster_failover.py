"""The store on a real Redis Cluster that changes under traffic: a slot migrated to a node that
never loaded the scripts, a flushed script cache, a manual failover, a killed master, every
master stopped. Calls fail only as StoreDown, and succeed again once the cluster has settled."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from proxy.limits import Limiter
from proxy.redis_mux import ClusterMux
from proxy.store import REDIS_TIMEOUT_S, Store
from tests.integration.test_store_failures import (
    AdmittedKey,
    Outcome,
    admissions,
    failures,
    new_keys,
)
from tests.servers import RedisServer, cluster_ready, redis_cluster, role_of, wait_for

pytestmark = pytest.mark.anyio
LEASE_MS = 60_000


async def cluster_store(node: RedisServer, *, shared: bool = True) -> Store:
    url = f"redis://127.0.0.1:{node.port}"
    client: Any = RedisCluster.from_url(
        url, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
    )  # fmt: skip
    timeouts = {"timeout_s": REDIS_TIMEOUT_S, "connect_timeout_s": REDIS_TIMEOUT_S}
    mux = ClusterMux(client, url, **timeouts) if shared else None
    return Store(client, cluster=True, mux=mux)


def owner_of(store: Store, key: AdmittedKey) -> str:
    node = store.client.get_node_from_key(f"{{{key.key_id}}}")
    return f"{node.host}:{node.port}"


def node_at(nodes: list[RedisServer], name: str) -> RedisServer:
    return next(n for n in nodes if f"127.0.0.1:{n.port}" == name)


def recovered_after(outcomes: list[Outcome], since: float) -> float:
    """Seconds from `since` to the first call started after it that succeeded, with every
    call started later succeeding too."""
    later = sorted((o for o in outcomes if o.started >= since), key=lambda o: o.started)
    last_failure = max((i for i, o in enumerate(later) if o.error), default=-1)
    assert last_failure + 1 < len(later), "no call succeeded after the change"
    return later[last_failure + 1].started - since


@pytest.fixture
def plain_cluster() -> Iterator[list[RedisServer]]:
    with redis_cluster() as nodes:
        yield nodes


@pytest.fixture
def replicated_cluster() -> Iterator[list[RedisServer]]:
    with redis_cluster(replicas=1, node_timeout_ms=1000) as nodes:
        yield nodes


@pytest.fixture(params=["mux", "redis-py"])
async def plain_store(
    request: pytest.FixtureRequest, plain_cluster: list[RedisServer]
) -> AsyncIterator[Store]:
    store = await cluster_store(plain_cluster[0], shared=request.param == "mux")
    yield store
    await store.aclose()


async def test_a_slot_migrated_to_a_new_node_under_traffic(
    plain_cluster: list[RedisServer], plain_store: Store
) -> None:
    store = plain_store
    limiter = Limiter(store, lease_ms=LEASE_MS)
    keys = await new_keys(store, 4)
    moving = keys[0]
    slot = store.client.keyslot(f"{{{moving.key_id}}}")
    source = node_at(plain_cluster, owner_of(store, moving))
    added = RedisServer(cluster=True)
    try:
        added.start()
        await asyncio.to_thread(
            source.cli, "--cluster", "add-node", f"127.0.0.1:{added.port}",
            f"127.0.0.1:{source.port}",
        )  # fmt: skip
        wait_for(lambda: cluster_ready([*plain_cluster, added]), what="the added node")

        migrated_at = 0.0

        async def migrate() -> None:
            nonlocal migrated_at
            await asyncio.sleep(0.3)
            target_id, source_id = added.cli("cluster", "myid"), source.cli("cluster", "myid")
            added.cli("cluster", "setslot", str(slot), "importing", source_id)
            source.cli("cluster", "setslot", str(slot), "migrating", target_id)
            await asyncio.sleep(0.3)  # traffic meets the slot half-moved: ASK, TRYAGAIN
            for name in source.cli("cluster", "getkeysinslot", str(slot), "100").split():
                source.cli("migrate", "127.0.0.1", str(added.port), name, "0", "5000")
                await asyncio.sleep(0.05)
            for node in [*plain_cluster, added]:
                node.cli("cluster", "setslot", str(slot), "node", target_id)
            migrated_at = time.monotonic()

        moved = asyncio.ensure_future(migrate())
        outcomes = await admissions(limiter, keys, rate_per_s=200, duration_s=2.5)
        await moved
        failed = failures(outcomes)  # StoreDown only
        print(f"\nslot migration: {len(outcomes)} calls, {len(failed)} StoreDown")
        # Only the moving slot's calls may fail (TRYAGAIN while its keys are split between the
        # nodes, past the retries), and none once it has moved.
        assert {o.key_id for o in failed} <= {moving.key_id}
        assert [o for o in failed if o.started > migrated_at] == []
        assert added.cli("script", "exists", store.admit_script.sha) == "1"
        after = await limiter.admit(
            moving.presented, request_id="after", model="m", token_estimate=1, cost_micros=0
        )
        assert after.admitted
    finally:
        added.cleanup()


async def test_a_flushed_script_cache_under_traffic(
    plain_cluster: list[RedisServer], plain_store: Store
) -> None:
    limiter = Limiter(plain_store, lease_ms=LEASE_MS)
    keys = await new_keys(plain_store, 6)

    async def flush() -> None:
        for _ in range(3):
            await asyncio.sleep(0.3)
            for node in plain_cluster:
                node.cli("script", "flush")

    flushing = asyncio.ensure_future(flush())
    outcomes = await admissions(limiter, keys, rate_per_s=200, duration_s=1.5)
    await flushing
    assert failures(outcomes) == []


async def test_every_master_stopped_is_store_down_within_the_deadline_then_recovers(
    plain_cluster: list[RedisServer], plain_store: Store
) -> None:
    limiter = Limiter(plain_store, lease_ms=LEASE_MS)
    keys = await new_keys(plain_store, 6)
    stopped_at = 0.0

    async def stop_and_resume() -> None:
        nonlocal stopped_at
        await asyncio.sleep(0.5)
        stopped_at = time.monotonic()
        for node in plain_cluster:
            assert node.process is not None
            node.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)
        for node in plain_cluster:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)

    try:
        stopping = asyncio.ensure_future(stop_and_resume())
        outcomes = await admissions(limiter, keys, rate_per_s=100, duration_s=6.0)
        await stopping
    finally:
        for node in plain_cluster:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)
    failed = failures(outcomes)  # StoreDown only
    slowest = max(o.elapsed_s for o in outcomes)
    resumed = stopped_at + 3.0
    print(
        f"\nall masters stopped 3 s ({'mux' if plain_store.mux else 'redis-py'}): "
        f"{len(failed)} StoreDown, slowest call {slowest:.2f} s"
    )
    recovery = recovered_after(outcomes, resumed)
    print(f"recovered {recovery:.2f} s after SIGCONT")
    # One deadline on both paths: redis-py's own retries after a timeout (a slot map
    # reload, then the call again) would otherwise ride out a 3 s stall unseen. The margin
    # is a busy machine's event-loop latency (as in test_store_failures).
    assert failed and slowest <= REDIS_TIMEOUT_S + 1.0 and recovery < 1.0
    after = await limiter.admit(
        keys[0].presented, request_id="after", model="m", token_estimate=1, cost_micros=0
    )
    assert after.admitted


@pytest.mark.parametrize("how", ["manual failover", "master killed"])
async def test_a_failover_under_traffic_is_store_down_then_the_new_master_serves(
    replicated_cluster: list[RedisServer], how: str
) -> None:
    store = await cluster_store(replicated_cluster[0])
    try:
        limiter = Limiter(store, lease_ms=LEASE_MS)
        keys = await new_keys(store, 6)
        await admissions(limiter, keys, rate_per_s=100, duration_s=0.3)  # connections made
        old_name = owner_of(store, keys[0])
        old = node_at(replicated_cluster, old_name)
        replica = next(
            n for n in replicated_cluster
            if n is not old and role_of(n) == "slave"
            and f"master_port:{old.port}" in n.cli("info", "replication")
        )  # fmt: skip
        changed_at = 0.0

        async def fail_over() -> None:
            nonlocal changed_at
            await asyncio.sleep(0.5)
            changed_at = time.monotonic()
            if how == "master killed":
                old.stop()
            else:
                replica.cli("cluster", "failover")

        switching = asyncio.ensure_future(fail_over())
        outcomes = await admissions(limiter, keys, rate_per_s=150, duration_s=8.0)
        await switching
        failed = failures(outcomes)  # StoreDown only
        recovery = recovered_after(outcomes, changed_at)
        print(f"\n{how}: {len(failed)} StoreDown, recovered after {recovery:.2f} s")
        assert role_of(replica) == "master"
        assert recovery < 6.0
        assert mux_nodes(store) and old_name not in mux_nodes(store)
        if how == "master killed":
            wait_for(lambda: cluster_ready(replicated_cluster), timeout_s=10, what="cluster ok")
    finally:
        await store.aclose()


def mux_nodes(store: Store) -> list[str]:
    assert isinstance(store.mux, ClusterMux)
    return store.mux.nodes
