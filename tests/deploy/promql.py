"""The metrics Tollgate exports (SPEC §7) and a small PromQL reader that checks a query
uses only those metrics, their labels and known functions.

Not a full PromQL parser: enough for the dashboard's and the alert rules' queries, and
strict, so anything it does not understand is reported rather than waved through.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Metric name -> its labels, as SPEC §7 fixes them (the upstream_* ones per issue 14:
# several upstreams, fallback and passive health; per issue 15, budgets: `reason` on the 402
# counter, credits | budget, and the share of each key's budget spent this period).
SPEC_METRICS: dict[str, frozenset[str]] = {
    "tollgate_requests_total": frozenset({"route", "model", "status", "key"}),
    "tollgate_request_duration_seconds": frozenset({"route", "model", "stream"}),
    "tollgate_upstream_ttft_seconds": frozenset({"model"}),
    "tollgate_tokens_total": frozenset({"model", "key", "kind"}),
    "tollgate_cost_usd_total": frozenset({"model", "key"}),
    "tollgate_rate_limited_total": frozenset({"key", "limit"}),
    "tollgate_credit_rejections_total": frozenset({"key", "reason"}),
    "tollgate_upstream_errors_total": frozenset({"reason"}),
    "tollgate_inflight_requests": frozenset(),
    "tollgate_active_streams": frozenset(),
    "tollgate_store_errors_total": frozenset(),
    "tollgate_spooled_usage_records": frozenset(),
    "tollgate_fail_open_admissions_total": frozenset(),
    "tollgate_upstream_requests_total": frozenset({"upstream", "outcome"}),
    "tollgate_upstream_fallbacks_total": frozenset({"from", "to"}),
    "tollgate_upstream_healthy": frozenset({"upstream"}),
    "tollgate_upstream_attempt_seconds": frozenset({"upstream"}),
    "tollgate_budget_used_ratio": frozenset({"key"}),
}
HISTOGRAMS = frozenset(
    {
        "tollgate_request_duration_seconds",
        "tollgate_upstream_ttft_seconds",
        "tollgate_upstream_attempt_seconds",
    }
)
# Prometheus adds these to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
FUNCTIONS = frozenset(
    {"sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "irate", "increase",
     "delta", "deriv", "histogram_quantile", "min_over_time", "max_over_time",
     "avg_over_time", "clamp_min", "absent", "vector", "sort_desc"}
)  # fmt: skip
KEYWORDS = frozenset({"and", "or", "unless", "bool"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_VARIABLE = re.compile(r"\$(?:\{\w+(?::\w+)?\}|\w+)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_NAME = re.compile(r"[A-Za-z_:][\w:]*")


def contract_name(metric: str) -> str:
    """`x_bucket`/`x_sum`/`x_count` of a SPEC histogram -> `x`; other names unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = metric.removesuffix(suffix)
        if base != metric and base in HISTOGRAMS:
            return base
    return metric


def metric_names(expr: str) -> set[str]:
    return _read(expr)[0]


def problems(expr: str, *, extra: Mapping[str, frozenset[str]] | None = None) -> list[str]:
    """What in `expr` is not a SPEC metric, one of its labels, or a known function.

    `extra` adds metrics beyond SPEC §7 (e.g. Prometheus' own `up`) with their labels.
    """
    known = {**SPEC_METRICS, **(extra or {})}
    metrics, matchers, grouping, functions = _read(expr)
    found = [f"unknown function {name}()" for name in sorted(functions - FUNCTIONS)]
    labels_in_expr = set(TARGET_LABELS)
    for metric in sorted(metrics):
        base = contract_name(metric)
        if base not in known:
            found.append(f"unknown metric {metric}")
            continue
        labels_in_expr |= known[base] | ({"le"} if metric.endswith("_bucket") else set())
    for metric, label in matchers:
        base = contract_name(metric)
        allowed = known.get(base, frozenset()) | TARGET_LABELS
        if metric.endswith("_bucket"):
            allowed |= {"le"}
        if not metric:
            found.append(f"selector without a metric name matches {label}")
        elif label not in allowed:
            found.append(f"{metric} has no label {label}")
    found += [f"grouping by {label}, which no metric here has" for label in
              sorted(grouping - labels_in_expr)]  # fmt: skip
    return found


def _read(expr: str) -> tuple[set[str], list[tuple[str, str]], set[str], set[str]]:
    """(metrics, (metric, matcher label) pairs, grouping labels, functions)."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _RANGE.sub("", text)
    metrics: set[str] = set()
    matchers: list[tuple[str, str]] = []
    grouping: set[str] = set()

    def selector(match: re.Match[str]) -> str:
        name = match.group(1) or ""
        matchers.extend((name, label) for label in _MATCHER.findall(match.group(2)))
        if name:
            metrics.add(name)
        return " "

    def group(match: re.Match[str]) -> str:
        grouping.update(label.strip() for label in match.group(1).split(",") if label.strip())
        return " "

    text = _SELECTOR.sub(selector, text)
    text = _GROUPING.sub(group, text)
    functions = set(_CALL.findall(text))
    text = _CALL.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    # Whatever word is left is a bare metric name (or a typo, which then is no known metric).
    metrics |= set(_NAME.findall(text)) - KEYWORDS
    return metrics, matchers, grouping, functions
