"""Short smoke runs of the benchmarks, so they keep working; figures are not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import limiter
from tests.bench.http import BACKGROUND_TRIPS
from tests.bench.load import wrk_binary
from tests.bench.nginx import (
    CONTENT_CHUNKS,
    messages_stream_events,
    nginx_binary,
    responses_stream_events,
    stream_events,
)
from tests.servers import REPO


def test_limiter_benchmark_runs_and_counts_one_round_trip_per_phase() -> None:
    rows = limiter.run(requests=64)
    assert [(r["client"], r["concurrency"]) for r in rows] == [
        ("mux", 1), ("mux", 32), ("redis-py", 1), ("redis-py", 32)
    ]  # fmt: skip
    for row in rows:
        assert row["requests"] == 64
        # Exactly one EVALSHA to admit and one to settle: the property, not a timing.
        assert row["commands"]["evalsha"] == 128
        assert row["round_trips_per_request"] == 2.0


def test_http_benchmark_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    # scripts/test.sh installs both from Debian's packages.
    assert Path(nginx_binary()).exists() and Path(wrk_binary()).exists()
    out = tmp_path / "http.json"
    command = [sys.executable, "-m", "tests.bench.http", "--smoke", "--json", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Four traffic types take about 70 s on a quiet 2-core machine, 110 s beside other work.
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the benchmark stops every server it started, then exits
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the smoke run took over 180 s:\n{output.decode()[-4000:]}")
    assert process.returncode == 0, output.decode()[-4000:]
    result = json.loads(out.read_text(encoding="utf-8"))

    rows = {(r["target"], r["traffic"]): r for r in result["rows"]}
    traffics = ("json", "stream", "responses", "messages")
    assert set(rows) == {(t, k) for t in ("tollgate-1w", "direct") for k in traffics}
    for row in rows.values():
        for connections in ("c1", "c32"):
            assert row[connections]["requests_per_s"] > 0
            assert row[connections]["p99_ms"] >= row[connections]["p50_ms"] >= 0
        assert row["rss_per_worker_mib"] > 0
    for traffic in traffics:
        row = rows[("tollgate-1w", traffic)]
        for connections in ("c1", "c32"):
            figures = row[connections]
            assert figures["proxy_cpu_us_per_request"] > 0
            assert figures["added_p50_ms"] is not None
            assert figures["redis_cpu_us_per_request"] > 0
            # One admit and one settle per request; no other command on the request path.
            assert figures["redis_script_calls_per_request"] == 2.0
            assert round(figures["redis_round_trips_per_request"], 1) == 2.0
        # Counted from what clients send (MONITOR), not from command names: exactly one admit
        # and one settle per request, and no other command on the request path. Beyond
        # BACKGROUND_TRIPS (a sweeper pass), one extra command on one request in 25 fails this.
        trips = result["round_trips"]["tollgate-1w"][traffic]
        assert trips["requests"] >= 8 * BACKGROUND_TRIPS
        assert trips["sent"].get("evalsha", 0) == 2 * trips["requests"], trips
        assert trips["round_trips"] <= 2 * trips["requests"] + BACKGROUND_TRIPS, trips
        assert trips["run_by_scripts"], "MONITOR showed no command run inside a script"
    # Checked before the timed runs: the stream through Tollgate is the upstream's, byte for byte.
    assert result["checks"]["tollgate-1w"]["stream"] == {
        "status": 200, "bytes": len(b"".join(stream_events())), "identical": True,
        "chunks": CONTENT_CHUNKS, "done": True,
    }  # fmt: skip
    assert result["checks"]["tollgate-1w"]["responses"] == {
        "status": 200, "bytes": len(b"".join(responses_stream_events())), "identical": True,
        "chunks": CONTENT_CHUNKS, "done": True,
    }  # fmt: skip
    assert result["checks"]["tollgate-1w"]["messages"] == {
        "status": 200, "bytes": len(b"".join(messages_stream_events())), "identical": True,
        "chunks": CONTENT_CHUNKS, "done": True,
    }  # fmt: skip
    assert CONTENT_CHUNKS == 20
    # The Responses and Anthropic streams' CPU is reported beside the chat stream's, from the
    # same run.
    (cpu,) = result["stream_cpu"]
    assert cpu["target"] == "tollgate-1w"
    for connections in ("c1", "c32"):
        figures = cpu[connections]
        assert figures["chat_stream_us"] > 0
        assert figures["responses_stream_us"] > 0 and figures["responses_ratio"] > 0
        assert figures["messages_stream_us"] > 0 and figures["messages_ratio"] > 0


def test_soak_short_run_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    # Offered at 40 % of the maximum, not the full run's 70 %: on a small shared machine a
    # scheduler stall of a second then builds no backlog whose buffers the RSS verdict would
    # take for a leak in a phase this short.
    command = [sys.executable, "-m", "tests.bench.soak", "--short", "--streams", "50",
               "--phase1", "10", "--phase2", "10", "--load-fraction", "0.4",
               "--json", str(out)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the run stops every server it started, then exits
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the short soak took over 90 s:\n{output.decode()[-4000:]}")
    # Every verdict of verdicts.checks() is enforced (1 means one failed): errors, drained
    # gauges, leaked slots and reservations, sockets back near idle, RSS growth after warm-up
    # and one usage record per request. Each holds at this size as at the full run's: the
    # socket verdict waits for upstream keep-alive expiry (5 s) whatever the load, and the RSS
    # one compares the end of phase 2 with its middle once the process is warm.
    assert out.exists(), output.decode()[-4000:]  # the run ended before its report
    result = json.loads(out.read_text(encoding="utf-8"))
    failed = [c for c in result["checks"] if not c["ok"]]
    assert process.returncode == 0, (failed, output.decode()[-4000:])
    assert result["ok"] and not failed

    for name in ("phase1", "phase2"):
        phase = result[name]
        assert phase["error_count"] == 0, phase["error_samples"]
        assert phase["completed"] > 0
        assert phase["drained"]
        # Exactly one usage record per request that reached the upstream, cut streams included.
        assert phase["usage_records"] == phase["completed"] + phase["aborted"]
        assert phase["store_after_drain"]["leaked_slots"] == 0
        assert phase["store_after_drain"]["reservations"] == 0
        assert phase["store_after_drain"]["reserved_micros"] == 0
    assert result["phase1"]["aborted"] > 0  # streams cut by the client are settled too (499)
    assert result["phase1"]["answered_by_status"].get("499", 0) > 0
