"""Prometheus config and alert rules: promtool-valid, unit-tested, and built on SPEC metrics."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.files import DEPLOY, load_yaml
from tests.deploy.promql import metric_names, problems
from tests.deploy.tools import output, run

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
# Prometheus' own per-target metric, for TollgateDown.
UP: dict[str, frozenset[str]] = {"up": frozenset()}


def _rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_config_and_its_rule_files() -> None:
    result = run("promtool", "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, output(result)
    assert "1 rule files found" in result.stdout, "the config must load alerts.yml"


def test_promtool_accepts_the_rules() -> None:
    result = run("promtool", "check", "rules", str(ALERTS))
    assert result.returncode == 0, output(result)


def test_alert_unit_tests_pass() -> None:
    result = run("promtool", "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, output(result)


def test_alert_unit_tests_fail_when_an_expectation_is_wrong(tmp_path: Path) -> None:
    # Guards the test above: a firing case that expects silence must make promtool fail.
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    tests = load_yaml(ALERT_TESTS)
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            check["exp_alerts"] = []
    (tmp_path / ALERT_TESTS.name).write_text(yaml.safe_dump(tests))
    result = run("promtool", "test", "rules", str(tmp_path / ALERT_TESTS.name))
    assert result.returncode != 0, output(result)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    checks = [
        check for case in load_yaml(ALERT_TESTS)["tests"] for check in case["alert_rule_test"]
    ]
    for rule in _rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']} never fires"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']} never quiet"


def test_alerts_use_only_spec_metrics() -> None:
    for rule in _rules():
        assert problems(rule["expr"], extra=UP) == [], rule["alert"]


def test_the_required_alerts_exist() -> None:
    metrics_by_alert = {rule["alert"]: metric_names(rule["expr"]) for rule in _rules()}
    required = [
        {"tollgate_rate_limited_total", "tollgate_requests_total"},
        {"tollgate_store_errors_total"},
        {"tollgate_spooled_usage_records"},
        {"tollgate_upstream_healthy"},
    ]
    for metrics in required:
        assert any(used == metrics for used in metrics_by_alert.values()), metrics


def test_upstream_error_ratio_counts_what_clients_see() -> None:
    """Failed attempts a fallback rescued count in tollgate_upstream_errors_total; the alert
    reads the 502/504 answers instead, the requests on which every attempt failed."""
    (rule,) = [rule for rule in _rules() if rule["alert"] == "TollgateUpstreamErrorRatio"]
    assert metric_names(rule["expr"]) == {"tollgate_requests_total"}
    assert 'tollgate_requests_total{status=~"502|504"}' in rule["expr"]


def test_upstream_unhealthy_takes_the_lowest_value_per_upstream() -> None:
    """One process that skips an upstream is enough; the alert names the upstream."""
    (rule,) = [rule for rule in _rules() if rule["alert"] == "TollgateUpstreamUnhealthy"]
    assert " ".join(rule["expr"].split()) == "min by (upstream) (tollgate_upstream_healthy) == 0"
    assert rule["for"] == "5m"
    assert rule["labels"]["severity"] == "warning"
    assert "{{ $labels.upstream }}" in rule["annotations"]["summary"]


def test_key_budget_nearly_spent_takes_the_highest_share_per_key() -> None:
    """Each process sets the gauge when it admits or settles one of the key's requests, so a
    replica that served the key earlier holds a lower value; the highest is the current one
    (a sum would add the replicas up). The alert names the key and the share."""
    (rule,) = [rule for rule in _rules() if rule["alert"] == "TollgateKeyBudgetNearlySpent"]
    assert " ".join(rule["expr"].split()) == "max by (key) (tollgate_budget_used_ratio) > 0.9"
    assert rule["for"] == "5m"
    assert rule["labels"]["severity"] == "warning"
    assert "{{ $labels.key }}" in rule["annotations"]["summary"]
    assert "{{ $value | humanizePercentage }}" in rule["annotations"]["summary"]


def test_every_alert_has_a_severity_and_summary() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
