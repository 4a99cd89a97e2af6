"""Passive health: failures in a row open an upstream's breaker, a cool-down skips it, one
probe closes or re-opens it, and tollgate_upstream_healthy{upstream} follows it."""

from __future__ import annotations

import pytest

from proxy.health import Health
from proxy.metrics import Metrics

THRESHOLD = 3
COOLDOWN_S = 30.0


class Clock:
    """Monotonic time the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(key_label=False, known_models=set())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(metrics: Metrics, clock: Clock) -> Health:
    return Health(
        ["a", "b", "c"],
        metrics.upstream_healthy,
        threshold=THRESHOLD,
        cooldown_s=COOLDOWN_S,
        clock=clock,
    )


def healthy(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value("tollgate_upstream_healthy", {"upstream": name})


def fail(health: Health, name: str, times: int) -> None:
    for _ in range(times):
        health.attempting(name)
        health.failed(name)


def open_past_cooldown(health: Health, clock: Clock, name: str) -> None:
    fail(health, name, THRESHOLD)
    clock.now += COOLDOWN_S


def test_every_upstream_starts_healthy_and_usable(health: Health, metrics: Metrics) -> None:
    assert [healthy(metrics, n) for n in ("a", "b", "c")] == [1.0, 1.0, 1.0]
    assert health.usable(["a", "b", "c"]) == ["a", "b", "c"]


def test_threshold_failures_in_a_row_open_the_upstream(health: Health, metrics: Metrics) -> None:
    fail(health, "a", THRESHOLD)
    assert healthy(metrics, "a") == 0.0
    assert health.usable(["a", "b", "c"]) == ["b", "c"]
    assert healthy(metrics, "b") == 1.0  # only the failing upstream's gauge moves


def test_fewer_failures_than_the_threshold_keep_it_closed(health: Health, metrics: Metrics) -> None:
    fail(health, "a", THRESHOLD - 1)
    assert healthy(metrics, "a") == 1.0
    assert health.usable(["a", "b"]) == ["a", "b"]


def test_a_success_resets_the_count_of_failures_in_a_row(health: Health, metrics: Metrics) -> None:
    fail(health, "a", THRESHOLD - 1)
    health.attempting("a")
    health.succeeded("a")
    fail(health, "a", THRESHOLD - 1)
    assert healthy(metrics, "a") == 1.0
    assert health.usable(["a", "b"]) == ["a", "b"]
    fail(health, "a", 1)  # now THRESHOLD in a row
    assert healthy(metrics, "a") == 0.0


def test_an_open_upstream_is_skipped_for_the_whole_cooldown(
    health: Health, metrics: Metrics, clock: Clock
) -> None:
    fail(health, "a", THRESHOLD)
    clock.now += COOLDOWN_S - 0.25
    assert health.usable(["a", "b"]) == ["b"]
    clock.now += 0.25
    assert health.usable(["a", "b"]) == ["a", "b"]
    assert healthy(metrics, "a") == 0.0  # half-open is not healthy yet


def test_after_the_cooldown_exactly_one_probe_is_offered(health: Health, clock: Clock) -> None:
    open_past_cooldown(health, clock, "a")
    assert health.usable(["a", "b"]) == ["a", "b"]
    health.attempting("a")  # this request is the probe
    assert health.usable(["a", "b"]) == ["b"]
    clock.now += 10 * COOLDOWN_S  # however long the probe takes
    assert health.usable(["a", "b"]) == ["b"]


def test_a_successful_probe_closes_the_upstream(
    health: Health, metrics: Metrics, clock: Clock
) -> None:
    open_past_cooldown(health, clock, "a")
    health.attempting("a")
    health.succeeded("a")
    assert healthy(metrics, "a") == 1.0
    assert health.usable(["a", "b"]) == ["a", "b"]
    fail(health, "a", THRESHOLD - 1)  # the count started again from zero
    assert health.usable(["a", "b"]) == ["a", "b"]
    health.attempting("a")  # closed: an attempt is no probe, any number may run
    assert health.usable(["a", "b"]) == ["a", "b"]


def test_a_failed_probe_reopens_for_a_new_cooldown(
    health: Health, metrics: Metrics, clock: Clock
) -> None:
    open_past_cooldown(health, clock, "a")
    clock.now += 5.0  # the probe starts a while after the cool-down ended
    health.attempting("a")
    health.failed("a")  # one failure is enough for a probe
    assert healthy(metrics, "a") == 0.0
    assert health.usable(["a", "b"]) == ["b"]
    clock.now += COOLDOWN_S - 0.25  # the new cool-down counts from the probe's failure
    assert health.usable(["a", "b"]) == ["b"]
    clock.now += 0.25
    assert health.usable(["a", "b"]) == ["a", "b"]


def test_an_attempt_ended_without_a_verdict_frees_the_probe(
    health: Health, metrics: Metrics, clock: Clock
) -> None:
    open_past_cooldown(health, clock, "a")
    probe = health.attempting("a")
    assert probe is True
    health.ended("a", probe=probe)
    assert health.usable(["a", "b"]) == ["a", "b"]  # the next request may probe
    assert healthy(metrics, "a") == 0.0  # but it is not closed
    assert health.attempting("a") is True
    assert health.usable(["a", "b"]) == ["b"]


def test_an_older_attempt_that_ends_does_not_free_the_probe(health: Health, clock: Clock) -> None:
    older = health.attempting("a")  # started while "a" was healthy
    assert older is False
    open_past_cooldown(health, clock, "a")
    assert health.attempting("a") is True  # the probe
    health.ended("a", probe=older)  # the older attempt's client left
    assert health.usable(["a", "b"]) == ["b"]  # still one probe only


def test_a_candidate_taken_out_since_it_was_chosen_is_skipped_unless_last(
    health: Health, clock: Clock
) -> None:
    open_past_cooldown(health, clock, "a")
    assert health.attempting("a") is True  # one request probes it
    assert health.attempting("a") is None  # another, which chose it earlier, skips it
    assert health.attempting("a", last_resort=True) is False  # unless nothing is left
    fail(health, "b", THRESHOLD)
    assert health.attempting("b") is None  # open, cooling down
    assert health.attempting("c") is False  # healthy: an ordinary attempt


def test_usable_keeps_the_given_order(health: Health) -> None:
    fail(health, "b", THRESHOLD)
    assert health.usable(["c", "b", "a"]) == ["c", "a"]


def test_when_every_candidate_is_open_the_first_is_tried_anyway(
    health: Health, clock: Clock
) -> None:
    for name in ("a", "b", "c"):
        fail(health, name, THRESHOLD)
    assert health.usable(["b", "c", "a"]) == ["b"]
    assert health.usable(["c"]) == ["c"]
    open_past_cooldown(health, clock, "a")
    health.attempting("a")  # a probe under way counts as skipped too
    assert health.usable(["a"]) == ["a"]
    assert health.usable([]) == []
