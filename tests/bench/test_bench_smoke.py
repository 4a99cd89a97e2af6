"""Short smoke runs of the benchmarks, so they keep working; figures are not asserted here."""

from __future__ import annotations

from tests.bench import limiter


def test_limiter_benchmark_runs_and_counts_one_round_trip_per_phase() -> None:
    rows = limiter.run(requests=64)
    assert [r["concurrency"] for r in rows] == [1, 32]
    for row in rows:
        assert row["requests"] == 64
        # Exactly one EVALSHA to admit and one to settle: the property, not a timing.
        assert row["commands"]["evalsha"] == 128
        assert row["round_trips_per_request"] == 2.0
