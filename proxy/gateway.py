"""The parts one process serves with, built once in the app's lifespan.

Handlers reach them through `request.app.state.gateway`. It holds parts only: each part does
one job (admission, the ledger, the upstream and its model list, the sweeper).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.admission import Admission
from proxy.config import Settings
from proxy.health import Health
from proxy.keys import Keyring
from proxy.ledger import Ledger
from proxy.metrics import Metrics
from proxy.models import ModelCatalog
from proxy.paths import PassthroughPaths
from proxy.routing import Selection
from proxy.store import Store
from proxy.sweeper import Sweeper
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True, kw_only=True)
class Gateway:
    settings: Settings
    store: Store
    metrics: Metrics
    keyring: Keyring
    admission: Admission
    ledger: Ledger
    upstreams: list[Upstream]
    selection: Selection
    health: Health
    models: ModelCatalog
    passthrough_paths: PassthroughPaths
    sweeper: Sweeper

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()
        await self.store.aclose()
