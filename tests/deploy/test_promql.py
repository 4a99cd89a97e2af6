"""The PromQL reader the dashboard and alert tests rely on must catch what they guard against."""

from __future__ import annotations

from tests.deploy.promql import contract_name, metric_names, problems


def test_query_using_spec_metrics_and_labels_has_no_problems() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(tollgate_request_duration_seconds_bucket"
        '{model=~"$model", stream="true"}[$__rate_interval])))'
        ' / on() group_left() sum(rate(tollgate_requests_total{key=~"${key}"}[5m])) > 1e3'
    )
    assert problems(expr) == []
    assert metric_names(expr) == {
        "tollgate_request_duration_seconds_bucket",
        "tollgate_requests_total",
    }


def test_metric_outside_spec_is_reported() -> None:
    assert problems("sum(rate(node_cpu_seconds_total[5m]))") == [
        "unknown metric node_cpu_seconds_total"
    ]
    assert problems("tollgate_active_stream") == ["unknown metric tollgate_active_stream"]


def test_label_the_metric_does_not_have_is_reported() -> None:
    assert problems('sum(rate(tollgate_rate_limited_total{model=~"$model"}[5m]))') == [
        "tollgate_rate_limited_total has no label model"
    ]
    assert problems("sum by (key) (tollgate_upstream_errors_total)") == [
        "grouping by key, which no metric here has"
    ]


def test_unknown_function_is_reported() -> None:
    assert problems("rat(tollgate_requests_total[5m])") == ["unknown function rat()"]


def test_suffixes_are_stripped_only_from_histograms() -> None:
    assert contract_name("tollgate_upstream_ttft_seconds_count") == "tollgate_upstream_ttft_seconds"
    assert problems("tollgate_requests_total_count") == [
        "unknown metric tollgate_requests_total_count"
    ]
