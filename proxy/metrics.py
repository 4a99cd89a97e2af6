"""Every Prometheus metric of Tollgate, in one place, with bounded label values.

Under several uvicorn workers prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR)
aggregates what each worker counts; the /metrics handler merges the files.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180)
OTHER_MODEL = "other"


class Metrics:
    """The metric objects plus the set of model names allowed as label values."""

    def __init__(
        self, *, key_label: bool, known_models: set[str], multiprocess_dir: bool = False
    ) -> None:
        self.key_label = key_label
        self.multiprocess_dir = multiprocess_dir
        self.known_models = set(known_models)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        key = ["key"] if key_label else []
        r = self.registry
        self.requests = Counter(
            "tollgate_requests", "Requests answered", ["route", "model", "status", *key],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "tollgate_request_duration_seconds", "Time from request to last byte",
            ["route", "model", "stream"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tollgate_upstream_ttft_seconds", "Time to the upstream's first byte",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tollgate_tokens", "Tokens metered", ["model", *key, "kind"], registry=r
        )
        self.cost = Counter("tollgate_cost_usd", "Cost metered, USD", ["model", *key], registry=r)
        self.rate_limited = Counter(
            "tollgate_rate_limited", "Requests refused by a limit", [*key, "limit"], registry=r
        )
        self.credit_rejections = Counter(
            "tollgate_credit_rejections", "Requests refused for credits or budget",
            [*key, "reason"], registry=r,
        )  # fmt: skip
        self.budget_used_ratio = Gauge(
            "tollgate_budget_used_ratio", "Budget spent / amount in the current period",
            key, registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.upstream_errors = Counter(
            "tollgate_upstream_errors", "Upstream failures", ["reason"], registry=r
        )
        self.upstream_requests = Counter(
            "tollgate_upstream_requests", "Upstream attempts, by how each ended",
            ["upstream", "outcome"], registry=r,
        )  # fmt: skip
        self.upstream_fallbacks = Counter(
            "tollgate_upstream_fallbacks", "Moves from a failed upstream to the next candidate",
            ["from", "to"], registry=r,
        )  # fmt: skip
        self.upstream_healthy = Gauge(
            "tollgate_upstream_healthy", "1 while an upstream is not skipped by passive health",
            ["upstream"], registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.upstream_attempt = Histogram(
            "tollgate_upstream_attempt_seconds", "Time to an attempt's response head or failure",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "tollgate_inflight_requests", "Requests in flight", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.active_streams = Gauge(
            "tollgate_active_streams", "Streams being relayed", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.store_errors = Counter(
            "tollgate_store_errors", "Store operations that failed", registry=r
        )
        self.spooled = Gauge(
            "tollgate_spooled_usage_records", "Usage records waiting in the spool directory",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.fail_open = Counter(
            "tollgate_fail_open_admissions", "Requests admitted unchecked while the store was down",
            registry=r,
        )  # fmt: skip

    def model(self, name: str) -> str:
        """Clamp a client-chosen model name so the label set cannot grow without bound."""
        return name if name in self.known_models else OTHER_MODEL

    def answered(self, route: str, model: str, status: int, key_name: str) -> None:
        """Count one answered request (every status, refusals included)."""
        labels = (route, self.model(model), str(status), *self.keyed(key_name))
        self._child(self.requests, labels).inc()

    def finished(
        self,
        *,
        route: str,
        model: str,
        stream: bool,
        status: int,
        key_name: str,
        elapsed_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        """Everything one request that reached the upstream adds to the metrics."""
        self.answered(route, model, status, key_name)
        model = self.model(model)
        keyed = self.keyed(key_name)
        streamed = "true" if stream else "false"
        self._child(self.duration, (route, model, streamed)).observe(elapsed_s)
        if ttft_s is not None:
            self._child(self.ttft, (model,)).observe(ttft_s)
        if prompt_tokens:
            self._child(self.tokens, (model, *keyed, "prompt")).inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, (model, *keyed, "completion")).inc(completion_tokens)
        if cost_usd:
            self._child(self.cost, (model, *keyed)).inc(cost_usd)

    def budget_used(self, key_name: str, ratio: float) -> None:
        """A key with a budget was admitted or settled: its share spent (keyed only)."""
        if self.key_label:
            self._child(self.budget_used_ratio, (key_name,)).set(ratio)

    def attempted(self, upstream: str, outcome: str, elapsed_s: float) -> None:
        """One upstream attempt ended: `outcome` is 2xx, 3xx, 4xx, 429, 5xx, connect or timeout."""
        self._child(self.upstream_requests, (upstream, outcome)).inc()
        self._child(self.upstream_attempt, (upstream,)).observe(elapsed_s)

    def fell_back(self, failed: str, next_upstream: str) -> None:
        self._child(self.upstream_fallbacks, (failed, next_upstream)).inc()

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus-client checks the label values and
        takes a lock on every `labels()` call, which the hot path does 3 to 6 times."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def keyed(self, key_name: str, *labels: str) -> tuple[str, ...]:
        return (key_name, *labels) if self.key_label else labels

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
