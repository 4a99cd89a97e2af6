"""The Grafana dashboard: every query reads SPEC metrics, every variable is used, every
SPEC metric is shown, and the dashboard finds its provisioned datasource."""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.files import DASHBOARD, GRAFANA, load_json, load_yaml
from tests.deploy.promql import SPEC_METRICS, contract_name, metric_names, problems


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = load_json(DASHBOARD)
    return dashboard


def _panels() -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in _dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions."""
    return {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in _panels()
        if panel["type"] != "row"
    }


def _exprs() -> list[str]:
    return [expr for exprs in _queries().values() for expr in exprs]


def _datasource_uid() -> str:
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    uid: str = datasource["uid"]
    return uid


def test_every_query_uses_only_spec_metrics_and_labels() -> None:
    for title, exprs in _queries().items():
        assert exprs, f"panel {title!r} has no query"
        for expr in exprs:
            assert problems(expr) == [], f"{title}: {expr}"


def test_every_spec_metric_is_on_the_dashboard() -> None:
    shown = {contract_name(metric) for expr in _exprs() for metric in metric_names(expr)}
    assert set(SPEC_METRICS) - shown == set()


def test_variables_query_spec_labels_and_are_all_used() -> None:
    variables = _dashboard()["templating"]["list"]
    assert {v["name"] for v in variables} == {"key", "model"}
    all_exprs = " ".join(_exprs())
    for variable in variables:
        name = variable["name"]
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert match and match.group(2) == name, variable["definition"]
        assert name in SPEC_METRICS[match.group(1)]
        # ".*" also matches series without the label (TOLLGATE_METRICS_KEY_LABEL=false).
        assert variable["includeAll"] and variable["allValue"] == ".*"
        assert re.search(rf"\$(?:{name}\b|\{{{name}\}})", all_exprs), f"${name} is never used"


def test_latency_panels_show_p50_p95_p99_from_the_histograms() -> None:
    for histogram in ("tollgate_request_duration_seconds", "tollgate_upstream_ttft_seconds"):
        exprs = " ".join(e for e in _exprs() if f"{histogram}_bucket" in e)
        quantiles = set(re.findall(r"histogram_quantile\(([\d.]+),", exprs))
        assert quantiles == {"0.5", "0.95", "0.99"}, histogram


def test_panels_use_the_provisioned_datasource() -> None:
    uid = _datasource_uid()
    assert "${DS_" not in DASHBOARD.read_text()
    for panel in _panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    for variable in _dashboard()["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = _panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert _dashboard()["uid"] == "tollgate"


def test_panels_do_not_overlap() -> None:
    def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
        grid = panel["gridPos"]
        return {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }

    taken: dict[tuple[int, int], str] = {}
    for panel in _panels():
        for cell in cells(panel):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]


def test_dashboard_provider_is_a_file_provider() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "tollgate.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_surfaces_row_splits_requests_errors_and_latency_by_route() -> None:
    """`route` is on the request counter and the duration histogram only (tokens and cost are
    by model and key), so those are what the Surfaces row shows per API surface."""
    panels = _panels()
    titles = [panel["title"] for panel in panels]
    row = titles.index("Surfaces")
    assert panels[row]["type"] == "row"
    exprs = " ".join(expr for title in titles[row + 1 : row + 5] for expr in _queries()[title])
    assert "sum by (route) (rate(tollgate_requests_total" in exprs
    assert 'sum by (route, status) (rate(tollgate_requests_total{status!~"2..",' in exprs
    assert "sum by (route, le) (rate(tollgate_request_duration_seconds_bucket" in exprs
    assert "sum by (route, stream) (rate(tollgate_request_duration_seconds_count" in exprs


def test_upstreams_row_shows_attempts_errors_fallbacks_health_and_latency_per_upstream() -> None:
    """The attempt metrics carry `upstream` but neither key nor model, so these panels split by
    upstream and take no variables."""
    panels = _panels()
    row = [panel["title"] for panel in panels].index("Upstreams")
    assert panels[row]["type"] == "row"
    exprs = []
    for panel in panels[row + 1 :]:
        if panel["type"] == "row":
            break
        exprs += [target["expr"] for target in panel["targets"]]
    joined = " ".join(exprs)
    attempts = "tollgate_upstream_requests_total"
    assert f"sum by (upstream, outcome) (rate({attempts}[" in joined
    # Error share: the failed outcomes over all attempts, per upstream.
    (share,) = [expr for expr in exprs if "outcome=~" in expr]
    failed = re.search(r'outcome=~"([^"]*)"', share)
    assert failed and set(failed.group(1).split("|")) == {"5xx", "connect", "timeout", "429"}
    assert f"/ sum by (upstream) (rate({attempts}[" in share
    assert "sum by (from, to) (rate(tollgate_upstream_fallbacks_total[" in joined
    assert "min by (upstream) (tollgate_upstream_healthy)" in joined
    latency = " ".join(expr for expr in exprs if "tollgate_upstream_attempt_seconds_bucket" in expr)
    quantiles = re.findall(r"histogram_quantile\(([\d.]+), sum by \(upstream, le\)", latency)
    assert sorted(quantiles) == ["0.5", "0.95"]


def test_limits_row_splits_402s_by_reason_and_shows_the_budget_used_per_key() -> None:
    """402s are `credits` or `budget`; the budget gauge is per process, so the panel takes the
    highest any replica reports, as the alert does, and marks 90 % and 100 %."""
    panels = _panels()
    row = [panel["title"] for panel in panels].index("Limits and credits")
    assert panels[row]["type"] == "row"
    mine = {}
    for panel in panels[row + 1 :]:
        if panel["type"] == "row":
            break
        mine[panel["title"]] = panel
    (rejections,) = [target["expr"] for target in mine["402s by key and reason"]["targets"]]
    assert rejections == (
        'sum by (key, reason) (rate(tollgate_credit_rejections_total{key=~"$key"}'
        "[$__rate_interval]))"
    )
    budget = mine["Budget used by key"]
    (used,) = [target["expr"] for target in budget["targets"]]
    assert used == 'max by (key) (tollgate_budget_used_ratio{key=~"$key"})'
    defaults = budget["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    steps = [step["value"] for step in defaults["thresholds"]["steps"]]
    assert steps == [None, 0.9, 1]
