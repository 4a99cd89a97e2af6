"""The metrics as an operator sees them: `tollgate serve --workers 2` under a short mixed load,
scraped every second by a real Prometheus that loads deploy/prometheus/alerts.yml. Every
dashboard query and alert expression must evaluate there, the traffic panels must show data,
and /metrics must count exactly across both workers (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.credits import load_prices
from tests.admin_client import Admin
from tests.deploy.files import DASHBOARD, DEPLOY, load_json, load_yaml
from tests.deploy.tools import tool
from tests.servers import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    free_port,
    mock_upstream_server,
    proxy_server,
    redis_server,
    tollgate_env,
    wait_for,
)

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "Say hello"}]
# What the dashboard's variables and Grafana's interval macros become in a plain query.
INTERVAL = "1m"
ALL = ".*"
# Panels that may show nothing under this load, and why. Every other panel's every query must
# return at least one series.
MAY_BE_EMPTY = {
    "Store errors and fail-open admissions": "Redis stays up, and the fail mode is closed",
    "Spooled usage records": "usage is spooled only while Redis is unreachable",
    "Budget used by key": "no key of this load has a budget; the gauge exists only for those",
}


@dataclass
class Traffic:
    """What the clients saw, to compare with what the metrics say."""

    ok: Counter[str] = field(default_factory=Counter)  # 200s by key name
    ok_streams: int = 0
    upstream_errors: int = 0  # 502s from the upstream's 500
    rate_limited: int = 0  # 429s
    credit_rejected: int = 0  # 402s
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0

    def add_usage(self, model: str, usage: dict[str, Any]) -> None:
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cost_micros += load_prices(None).cost_micros(
            model, usage["prompt_tokens"], usage["completion_tokens"]
        )


@dataclass
class Live:
    proxy_url: str
    prometheus_url: str
    metrics_dir: Path
    secrets: list[str]
    traffic: Traffic


def _chat(
    url: str, secret: str, *, model: str = MODEL, stream: bool = False, **extra: Any
) -> tuple[int, dict[str, Any] | None]:
    """One request on a fresh connection (so both workers get some); (status, usage)."""
    body = {"model": model, "messages": MESSAGES, "stream": stream, **extra}
    headers = {"authorization": f"Bearer {secret}"}
    if not stream:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=20)
        usage = response.json().get("usage") if response.status_code == 200 else None
        return response.status_code, usage
    usage = None
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=20
    ) as response:
        lines = list(response.iter_lines())
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    if response.status_code == 200:
        assert events[-1] == "[DONE]", lines
        usage = json.loads(events[-2])["usage"]
    return response.status_code, usage


def _surface(url: str, secret: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One JSON request to another surface; (status, usage in chat's names)."""
    headers = {"authorization": f"Bearer {secret}"}
    response = httpx.post(f"{url}/v1{path}", json=body, headers=headers, timeout=20)
    if response.status_code != 200:
        return response.status_code, None
    usage = response.json()["usage"]
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return 200, {"prompt_tokens": prompt, "completion_tokens": completion}


def _record(traffic: Traffic, key_name: str, model: str, answer: tuple[int, Any]) -> None:
    status, usage = answer
    if status == 200:
        traffic.ok[key_name] += 1
        traffic.add_usage(model, usage)
    elif status == 429:
        traffic.rate_limited += 1
    elif status == 402:
        traffic.credit_rejected += 1
    elif status == 502:
        traffic.upstream_errors += 1
    else:
        raise AssertionError(f"unexpected status {status}")


def _requests_by_worker(metrics_dir: Path) -> dict[str, float]:
    """Each worker's own count of answered requests, from its multiprocess file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        samples = [
            sample.value
            for metric in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
            for sample in metric.samples
            if sample.name == "tollgate_requests_total"
        ]
        counts[path.stem.removeprefix("counter_")] = sum(samples)
    return counts


def _drive_load(url: str, keys: dict[str, dict[str, Any]], metrics_dir: Path) -> Traffic:
    """A short, bounded mix: JSON and streams, a 429, a 402 and an upstream 500."""
    traffic = Traffic()
    plain, limited, broke = keys["live-plain"], keys["live-limited"], keys["live-broke"]
    jobs: list[tuple[str, bool]] = [(MODEL, False)] * 6 + [(MODEL, True)] * 4
    jobs += [("gpt-4o", False), ("gpt-4o", True)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            (model, stream, pool.submit(_chat, url, plain["key"], model=model, stream=stream))
            for model, stream in jobs
        ]
        for model, stream, future in futures:
            answer = future.result()
            _record(traffic, "live-plain", model, answer)
            traffic.ok_streams += int(stream and answer[0] == 200)
    # Two more surfaces, so the dashboard's per-route panels split something.
    responses = {"model": MODEL, "input": "Say hello"}
    _record(traffic, "live-plain", MODEL, _surface(url, plain["key"], "/responses", responses))
    embedding = {"model": EMBEDDING_MODEL, "input": "Say hello"}
    answer = _surface(url, plain["key"], "/embeddings", embedding)
    _record(traffic, "live-plain", EMBEDDING_MODEL, answer)
    # rpm=2: two answers, then the bucket is empty for the next 30 s.
    for _ in range(4):
        _record(traffic, "live-limited", MODEL, _chat(url, limited["key"]))
    # 100 micro-dollars cover a 16-token answer, never the default 1024-token reservation.
    _record(traffic, "live-broke", MODEL, _chat(url, broke["key"], max_tokens=16))
    _record(traffic, "live-broke", MODEL, _chat(url, broke["key"]))
    _record(traffic, "live-plain", "mock-error", _chat(url, plain["key"], model="mock-error"))
    assert traffic.ok == {"live-plain": 14, "live-limited": 2, "live-broke": 1}, traffic
    assert (traffic.rate_limited, traffic.credit_rejected, traffic.upstream_errors) == (2, 1, 1)
    # The exactness checks below mean something only if both workers answered requests.
    for _ in range(40):
        if len([n for n in _requests_by_worker(metrics_dir).values() if n]) >= 2:
            break
        _record(traffic, "live-plain", MODEL, _chat(url, plain["key"]))
    assert len([n for n in _requests_by_worker(metrics_dir).values() if n]) >= 2
    return traffic


@contextmanager
def _prometheus(workdir: Path, target: str) -> Iterator[str]:
    """Prometheus scraping `target` every second with the repository's alert rules."""
    workdir.mkdir()
    shutil.copy(ALERTS, workdir / ALERTS.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [ALERTS.name],
        "scrape_configs": [{"job_name": "tollgate", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError((workdir / "prometheus.log").read_text())
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200

            wait_for(ready, timeout_s=20, what="prometheus to be ready")
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _query(prometheus_url: str, expr: str) -> dict[str, Any]:
    response = httpx.get(
        f"{prometheus_url}/api/v1/query", params={"query": expr, "time": time.time()}, timeout=10
    )
    answer: dict[str, Any] = response.json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer


def _series(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    data = _query(prometheus_url, expr)["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


def _rules(prometheus_url: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _wait_for_samples(live: Live, load_ended: float) -> None:
    """Until Prometheus holds a few scrapes, one after the load, and has evaluated every rule."""
    status_200 = 'tollgate_requests_total{status="200"}'

    def scraped() -> bool:
        samples = _series(live.prometheus_url, f"min(count_over_time({status_200}[{INTERVAL}]))")
        latest = _series(live.prometheus_url, f"min(timestamp({status_200}))")
        return (
            bool(samples and latest)
            and float(samples[0]["value"][1]) >= 3
            and float(latest[0]["value"][1]) > load_ended
        )

    wait_for(scraped, timeout_s=20, what="prometheus to scrape the proxy after the load")
    wait_for(
        lambda: all(rule["health"] == "ok" for rule in _rules(live.prometheus_url)),
        timeout_s=10,
        what="every alert rule to be evaluated",
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("prometheus-live")
    metrics_dir = tmp / "metrics"
    with redis_server() as redis, mock_upstream_server() as upstream:
        # `mock-error` goes first to an upstream that refuses connections, then falls back to
        # the mock (which answers it 500): the fallback panels get data.
        registry = tmp / "upstreams.toml"
        registry.write_text(
            f'[upstreams.refusing]\nurl = "http://127.0.0.1:{free_port()}/v1"\n'
            'models = ["mock-error"]\npriority = 1\n\n'
            f'[upstreams.mock]\nurl = "{upstream}"\napi_key_env = "TOLLGATE_UPSTREAM_API_KEY"\n'
            "priority = 2\n"
        )
        env = tollgate_env(
            redis_url=redis.url,
            upstream_url=upstream,
            spool_dir=tmp / "spool",
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            TOLLGATE_UPSTREAMS=str(registry),
        )
        args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]
        with proxy_server(env=env, args=args, ready_path="/readyz") as proxy:
            with Admin(proxy.url) as admin:
                keys = {
                    "live-plain": admin.create_key(name="live-plain"),
                    "live-limited": admin.create_key(name="live-limited", rpm=2),
                    "live-broke": admin.create_key(name="live-broke", credits=0.0001),
                }
            with _prometheus(tmp / "prometheus", f"127.0.0.1:{proxy.port}") as prometheus_url:
                traffic = _drive_load(proxy.url, keys, metrics_dir)
                secrets = [k["key"] for k in keys.values()] + [ADMIN_TOKEN, UPSTREAM_KEY]
                live = Live(proxy.url, prometheus_url, metrics_dir, secrets, traffic)
                _wait_for_samples(live, load_ended=time.time())
                yield live


def _panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard that has queries, including those nested in rows."""
    found = []
    for panel in load_json(DASHBOARD)["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [panel for panel in found if panel["type"] != "row"]


def _substitute(expr: str) -> str:
    """Grafana's macros and the dashboard's variables (at "All") as Prometheus sees them."""
    expr = re.sub(r"\$(?:__rate_interval|__interval|__range)\b", INTERVAL, expr)
    variables = [v["name"] for v in load_json(DASHBOARD)["templating"]["list"]]
    for name in variables:
        expr = re.sub(rf"\$(?:\{{{name}\}}|{name}\b)", ALL, expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_evaluates_and_traffic_panels_show_data(live: Live) -> None:
    panels = _panels()
    assert set(MAY_BE_EMPTY) <= {panel["title"] for panel in panels}
    empty = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            series = _series(live.prometheus_url, _substitute(target["expr"]))
            if not series and panel["title"] not in MAY_BE_EMPTY:
                empty.append(f"{panel['title']} [{target['refId']}]: {target['expr']}")
    assert empty == [], "panels without data under a load that should fill them"


def test_dashboard_panels_split_by_the_labels_the_load_produced(live: Live) -> None:
    def values(expr: str, label: str) -> set[str]:
        return {s["metric"].get(label, "") for s in _series(live.prometheus_url, expr)}

    by_status = 'sum by (status) (rate(tollgate_requests_total{key=~".*", model=~".*"}[1m]))'
    assert {"200", "502"} <= values(by_status, "status")
    by_model = 'sum by (model) (rate(tollgate_requests_total{key=~".*", model=~".*"}[1m]))'
    assert {MODEL, "gpt-4o"} <= values(by_model, "model")
    by_route = 'sum by (route) (rate(tollgate_requests_total{key=~".*", model=~".*"}[1m]))'
    assert values(by_route, "route") == {"chat_completions", "responses", "embeddings"}
    limits = 'sum by (key, limit) (rate(tollgate_rate_limited_total{key=~".*"}[1m]))'
    assert values(limits, "limit") == {"requests"}
    assert values(limits, "key") == {"live-limited"}
    credits = 'sum by (key) (rate(tollgate_credit_rejections_total{key=~".*"}[1m]))'
    assert values(credits, "key") == {"live-broke"}
    errors = "sum by (reason) (rate(tollgate_upstream_errors_total[1m]))"
    assert values(errors, "reason") == {"status", "connect"}  # the refusing upstream's
    attempts = "sum by (upstream, outcome) (rate(tollgate_upstream_requests_total[1m]))"
    assert values(attempts, "upstream") == {"refusing", "mock"}
    assert {"connect", "2xx", "5xx"} <= values(attempts, "outcome")


def test_every_alert_expression_evaluates_and_every_rule_is_healthy(live: Live) -> None:
    rules = [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        _query(live.prometheus_url, rule["expr"])
    loaded = {rule["name"]: rule for rule in _rules(live.prometheus_url)}
    assert set(loaded) == {rule["alert"] for rule in rules}
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
    # The target is the live proxy, up: TollgateDown must be quiet.
    assert loaded["TollgateDown"]["state"] == "inactive"
    up = _series(live.prometheus_url, 'up{job="tollgate"}')
    assert [s["value"][1] for s in up] == ["1"]


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_exactly_across_two_workers(live: Live) -> None:
    traffic = live.traffic
    samples = _samples(live.proxy_url)
    # Each scrape is answered by one worker; both must report the same merged totals.
    assert sorted(map(repr, _samples(live.proxy_url))) == sorted(map(repr, samples))
    assert _total(samples, "tollgate_requests_total", status="200") == sum(traffic.ok.values())
    for key_name, count in traffic.ok.items():
        assert _total(samples, "tollgate_requests_total", status="200", key=key_name) == count
    assert _total(samples, "tollgate_requests_total", status="502") == traffic.upstream_errors
    assert _total(samples, "tollgate_upstream_errors_total", reason="status") == 1
    moved = {"from": "refusing", "to": "mock"}
    assert _total(samples, "tollgate_upstream_fallbacks_total", **moved) == 1
    assert _total(samples, "tollgate_upstream_requests_total", upstream="refusing") == 1
    limited = _total(samples, "tollgate_rate_limited_total", limit="requests")
    assert limited == traffic.rate_limited
    assert _total(samples, "tollgate_rate_limited_total") == traffic.rate_limited
    assert _total(samples, "tollgate_credit_rejections_total") == traffic.credit_rejected
    assert _total(samples, "tollgate_tokens_total", kind="prompt") == traffic.prompt_tokens
    assert _total(samples, "tollgate_tokens_total", kind="completion") == traffic.completion_tokens
    cost = _total(samples, "tollgate_cost_usd_total")
    assert math.isclose(cost, traffic.cost_micros / 1_000_000, rel_tol=1e-9)
    answered = sum(traffic.ok.values()) + traffic.upstream_errors
    duration = "tollgate_request_duration_seconds_count"
    assert _total(samples, duration) == answered
    assert _total(samples, duration, stream="true") == traffic.ok_streams
    assert _total(samples, "tollgate_upstream_ttft_seconds_count") == answered
    assert _total(samples, "tollgate_inflight_requests") == 0
    assert _total(samples, "tollgate_active_streams") == 0
    # The merged view is the sum of the workers' own files, not one worker's view.
    by_worker = _requests_by_worker(live.metrics_dir)
    assert len([n for n in by_worker.values() if n]) == 2, by_worker
    assert sum(by_worker.values()) == _total(samples, "tollgate_requests_total")


def test_prometheus_sees_the_totals_of_both_workers(live: Live) -> None:
    def total(expr: str) -> float:
        (sample,) = _series(live.prometheus_url, f"sum({expr})")
        return float(sample["value"][1])

    traffic = live.traffic
    assert total('tollgate_requests_total{status="200"}') == sum(traffic.ok.values())
    assert total('tollgate_rate_limited_total{limit="requests"}') == traffic.rate_limited
    assert total("tollgate_credit_rejections_total") == traffic.credit_rejected
    assert total('tollgate_tokens_total{kind="completion"}') == traffic.completion_tokens


def test_refused_requests_are_counted_with_their_status(live: Live) -> None:
    # SPEC §7: tollgate_requests_total counts answered requests by numeric status ("429"),
    # which the dashboard's rate-limited share and the TollgateHighRateLimitedRatio alert use.
    samples = _samples(live.proxy_url)
    assert _total(samples, "tollgate_requests_total", status="429") == live.traffic.rate_limited
    assert _total(samples, "tollgate_requests_total", status="402") == live.traffic.credit_rejected


def test_no_metric_line_contains_a_secret(live: Live) -> None:
    text = httpx.get(f"{live.proxy_url}/metrics", timeout=10).text
    for secret in live.secrets:
        assert secret not in text
        if secret.startswith("sk-tg-"):  # <id>_<secret>: not even the part after the id
            assert secret.partition("_")[2] not in text
    keys = {labels["key"] for _, labels, _ in _samples(live.proxy_url) if "key" in labels}
    assert keys == {"live-plain", "live-limited", "live-broke"}
