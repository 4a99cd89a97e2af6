"""The store: Redis client construction, every Redis key name, and the Lua scripts.

With no Redis URL the store is in-process (fakeredis running the very same Lua scripts), for
`tollgate demo` and single-process use. Every failure of the store itself (connection, timeout,
cluster, a server that refuses work for now) becomes StoreDown here, and nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from proxy.config import Settings
from proxy.redis_mux import ClusterMux, RedisMux

log = logging.getLogger("tollgate.store")
T = TypeVar("T")

# redis-py's classes for "the store cannot do this now": the connection (refused, lost, timed
# out, not authenticated, max number of clients reached), the cluster (no reachable node, slots
# not covered, CLUSTERDOWN, MASTERDOWN, redirections or TRYAGAIN past the retry budget), a server
# loading its data set, a replica refusing writes, memory full, a reply that could not be read.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # and AuthenticationError, BusyLoadingError, MaxConnections
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # and ClusterDownError, MasterDownError; "TTL exhausted"
    redis.exceptions.RedisClusterException,  # and SlotNotCoveredError; "cannot be connected"
    redis.exceptions.AskError,  # and MovedError
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.InvalidResponse,
    OSError,
)
# Error replies redis-py has no class for that mean the same: a script running too long
# (BUSY), writes refused after a failed snapshot (MISCONF), too few replicas (NOREPLICAS).
_UNAVAILABLE_CODES = frozenset({"BUSY", "MISCONF", "NOREPLICAS"})

KEY_INDEX = "tollgate:keys"
# A usage record written longer than this after its request (a replayed spool, a swept
# request) is indexed by the request's time as well; on time, it is found by its own.
LATE_RECORD_MS = 15 * 60 * 1000
REDIS_POOL_SIZE = 64  # connections per process to a single Redis
REDIS_POOL_WAIT_S = 30.0
REDIS_TIMEOUT_S = 2.0  # a Redis that has not answered in this long counts as down
NOSCRIPT_RETRIES = 2  # script loads before a NOSCRIPT is an error


class StoreDown(Exception):
    """Redis could not be reached; the caller decides between 503 and fail-open."""


# Every Redis key of one API key carries the hash tag {<key id>}: one cluster slot per API key,
# so each script touches one slot.
def record_key(key_id: str) -> str:
    return f"tollgate:key:{{{key_id}}}"


def bucket_key(key_id: str) -> str:
    return f"tollgate:bucket:{{{key_id}}}"


def inflight_key(key_id: str) -> str:
    return f"tollgate:inflight:{{{key_id}}}"


def reserved_key(key_id: str) -> str:
    return f"tollgate:reserved:{{{key_id}}}"


def usage_key(key_id: str) -> str:
    return f"tollgate:usage:{{{key_id}}}"


def aggregates_key(key_id: str) -> str:
    return f"tollgate:agg:{{{key_id}}}"


def settled_key(key_id: str) -> str:
    return f"tollgate:settled:{{{key_id}}}"


def late_key(key_id: str) -> str:
    return f"tollgate:late:{{{key_id}}}"


def admission_keys(key_id: str) -> list[str]:
    return [record_key(key_id), bucket_key(key_id), inflight_key(key_id), reserved_key(key_id)]


def settlement_keys(key_id: str) -> list[str]:
    return [
        *admission_keys(key_id),
        usage_key(key_id),
        aggregates_key(key_id),
        settled_key(key_id),
        late_key(key_id),
    ]


def release_keys(key_id: str) -> list[str]:
    return [*admission_keys(key_id), settled_key(key_id)]


@contextmanager
def store_errors(*, cluster: bool = False) -> Iterator[None]:
    """Translate the store's failures into StoreDown, once, at this boundary."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
    except AttributeError as exc:
        # redis-py 6.4's cluster client, when its node map is torn down by a failure while
        # other commands are under way, calls methods on a node that is None; the cluster
        # is unreachable for it, which is a store failure, not a bug of the caller.
        if not (cluster and str(exc).startswith("'NoneType' object has no attribute")):
            raise
        raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        if str(exc).split(" ", 1)[0] not in _UNAVAILABLE_CODES:
            raise
        raise StoreDown(f"{type(exc).__name__}: {exc}") from exc


def _script_source(name: str) -> str:
    return resources.files("proxy").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class Store:
    """A Redis (or in-process) client plus the registered Lua scripts."""

    def __init__(
        self,
        client: Any,
        *,
        cluster: bool = False,
        mux: RedisMux | ClusterMux | None = None,
    ) -> None:
        self.client = client
        self.cluster = cluster
        # redis-py drops a startup node for good when it fails; these put them back.
        self._seeds: list[tuple[str, int]] = (
            [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()]
            if cluster
            else []
        )
        self.mux = mux  # the hot path's shared connection, when the server allows one
        self.admit_script: AsyncScript = client.register_script(_script_source("limits_admit"))
        self.settle_script: AsyncScript = client.register_script(_script_source("limits_settle"))
        self.release_script: AsyncScript = client.register_script(_script_source("limits_release"))

    async def run(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """EVALSHA a registered script (loading it on NOSCRIPT), with failures as StoreDown.

        Over the shared connection when there is one; otherwise straight to redis-py's
        `evalsha` (its Script wrapper checks its client's type on every call). On a cluster,
        SCRIPT LOAD goes to every master, so a node that owns the slot after a migration or a
        failover has it too.
        """
        with self._errors():
            if self.mux is not None:
                return await self.mux.evalsha(script.sha, str(script.script), keys, args)
            if not self.cluster:  # bounded by socket_timeout; a pool wait is queueing
                return await self._evalsha(script, keys, args)
            # redis-py retries a timed-out cluster call after reloading the slot map, each
            # step with its own socket timeout: one deadline makes a stall StoreDown in
            # REDIS_TIMEOUT_S, as on the shared connection (TimeoutError is an OSError).
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                return await self._evalsha(script, keys, args)

    async def _evalsha(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        for _ in range(NOSCRIPT_RETRIES):
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:  # flushed again since the last load
                await self._load(script, keys[0])
        return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            with store_errors(cluster=self.cluster):
                yield
        except StoreDown:
            if self.cluster:
                self._reseed()
            raise

    def _reseed(self) -> None:
        """After every node it knew failed, redis-py's cluster client has no startup node
        left and never connects again: give it the seeds (and the nodes it knew) back."""
        manager = self.client.nodes_manager
        known = [(n.host, n.port) for n in manager.nodes_cache.values()]
        for host, port in [*self._seeds, *known]:
            name = f"{host}:{port}"
            if name not in manager.startup_nodes:
                manager.startup_nodes[name] = ClusterNode(host, port, **manager.connection_kwargs)

    async def _load(self, script: AsyncScript, key: str) -> None:
        """SCRIPT LOAD; on a cluster, on every master redis-py knows and on the one that owns
        the key's slot now (after a MOVED redis-py knows it before it knows the master)."""
        await self.client.script_load(script.script)
        if self.cluster:
            nodes = self.client.nodes_manager
            owner = nodes.get_node_from_slot(self.client.keyslot(key))
            await self.client.execute_command("SCRIPT LOAD", script.script, target_nodes=owner)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, translating the store's failures into StoreDown."""
        with self._errors():
            return await operation()

    async def ping(self) -> bool:
        try:
            with self._errors():
                return bool(await self.client.ping())
        except StoreDown:
            return False

    async def aclose(self) -> None:
        if self.mux is not None:
            await self.mux.aclose()
        await self.client.aclose()


def embedded_client() -> Any:
    """An in-process Redis that runs Lua: fakeredis with lupa."""
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=True)


def open_store(settings: Settings) -> Store:
    if not settings.redis_url:
        log.warning(
            "TOLLGATE_REDIS_URL is not set: using an IN-PROCESS store. Keys, limits, credits "
            "and usage live in this process only and are lost when it exits. Set "
            "TOLLGATE_REDIS_URL for anything but a demo."
        )
        return Store(embedded_client())
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
    }
    # The hot path's shared connection(s), unless the URL needs options only redis-py has.
    shared = RedisMux.supports(settings.redis_url)
    timeouts: dict[str, Any] = {"timeout_s": REDIS_TIMEOUT_S, "connect_timeout_s": REDIS_TIMEOUT_S}
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(settings.redis_url, **common)
        cluster_mux = ClusterMux(cluster, settings.redis_url, **timeouts) if shared else None
        return Store(cluster, cluster=True, mux=cluster_mux)
    # A bounded pool: a burst waits for a connection instead of opening more for good, so many
    # replicas stay within Redis' maxclients. Waiting for one is queueing under load, not a
    # store failure, so it may take long (each operation itself is bounded by socket_timeout).
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT_S, **common
    )
    mux = RedisMux(settings.redis_url, **timeouts) if shared else None
    return Store(aioredis.Redis(connection_pool=pool), mux=mux)
