"""Metric samples as an operator scrapes them: labels bounded, secrets absent."""

from __future__ import annotations

from typing import Any

from proxy.config import Settings
from tests.conftest import HELLO, Harness


def _samples(harness: Harness, name: str) -> list[str]:
    text = harness.client.get("/metrics").text
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_key_label_names_the_key_and_never_its_secret(harness: Harness) -> None:
    record = harness.create_key(name="alice")
    assert harness.chat(record["key"]).status_code == 200
    samples = _samples(harness, "tollgate_requests_total")
    assert any('key="alice"' in s and 'status="200"' in s for s in samples)
    text = harness.client.get("/metrics").text
    assert record["key"] not in text
    assert record["key"].split("_", 1)[1] not in text


def test_key_label_off_drops_the_label(settings: Settings, harness_factory: Any) -> None:
    with harness_factory(settings, metrics_key_label=False) as harness:
        key = harness.create_key(name="alice")["key"]
        assert harness.chat(key).status_code == 200
        for name in ("tollgate_requests_total", "tollgate_tokens_total", "tollgate_cost_usd_total"):
            samples = _samples(harness, name)
            assert samples, name
            assert not any("key=" in s for s in samples), samples


def test_unknown_models_are_counted_as_other(harness: Harness) -> None:
    key = harness.create_key()["key"]
    for model in ("made-up-1", "made-up-2", "gpt-4o-mini"):
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        assert harness.chat(key, body).status_code == 200
    samples = _samples(harness, "tollgate_requests_total")
    assert any('model="other"' in s and s.endswith(" 2.0") for s in samples), samples
    assert any('model="gpt-4o-mini"' in s for s in samples)
    assert not any("made-up" in s for s in samples)


def test_upstream_models_are_labelled_without_any_client_asking_for_the_list(
    harness: Harness,
) -> None:
    # mock-slow is in the upstream's list but not in the price table; nobody calls /v1/models.
    key = harness.create_key()["key"]
    body = {"model": "mock-slow", "messages": [{"role": "user", "content": "Hi"}]}
    assert harness.chat(key, body).status_code == 200
    samples = _samples(harness, "tollgate_requests_total")
    assert any('model="mock-slow"' in s for s in samples), samples
    assert not any('model="other"' in s for s in samples), samples
    assert harness.mock.model_list_requests == 1


def test_metrics_never_show_a_secret(harness: Harness, key: str) -> None:
    harness.chat(key, HELLO)
    harness.chat(key, {**HELLO, "model": "mock-error"})
    text = harness.client.get("/metrics").text
    assert key not in text
    assert key.split("_", 1)[1] not in text


def test_requests_refused_before_admission_are_counted_by_status(harness: Harness) -> None:
    key = harness.create_key(rpm=1)["key"]
    assert harness.chat(key, {"model": "gpt-4o-mini", "messages": []}).status_code == 400
    assert harness.chat("sk-tg-nonsense").status_code == 401
    assert harness.chat(key).status_code == 200
    assert harness.chat(key).status_code == 429
    text = harness.client.get("/metrics").text
    for status, key_name in (("400", ""), ("401", ""), ("200", "test"), ("429", "test")):
        assert any(
            sample.startswith("tollgate_requests_total{")
            and f'status="{status}"' in sample
            and f'key="{key_name}"' in sample
            and sample.endswith(" 1.0")
            for sample in text.splitlines()
        ), status
