"""The usage spool: what waits on disk while Redis is down is replayed once, including files a
dead process left behind mid-replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy import store as keys_of
from proxy.spool import Spool
from tests.conftest import Harness


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _settlement(key_id: str, request_id: str) -> dict[str, Any]:
    record = {"request_id": request_id, "ts": "2026-11-22T00:00:00.000+00:00", "model": "m",
              "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.0}  # fmt: skip
    return {
        "key_id": key_id, "request_id": request_id, "day": "2026-11-22", "model": "m",
        "prompt_tokens": 3, "completion_tokens": 4, "cost_micros": 0,
        "record_json": json.dumps(record),
    }  # fmt: skip


def test_files_include_claims_of_dead_processes_but_not_of_live_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    own = tmp_path / "usage-1.jsonl"
    orphan = tmp_path / f"usage-2.replaying-{_dead_pid()}"
    busy = tmp_path / f"usage-3.replaying-{os.getppid()}"
    for path in (own, orphan, busy):
        path.write_text("{}\n")
    assert spool.files() == sorted([own, orphan])
    assert spool.pending() == 2


def test_replay_lands_every_spooled_record_exactly_once(harness: Harness) -> None:
    key_id = harness.create_key()["id"]
    spool = harness.gateway.ledger.spool
    spool.append(json.dumps(_settlement(key_id, "spooled-1")))
    orphan = spool.directory / f"usage-77.replaying-{_dead_pid()}"
    orphan.write_text(json.dumps(_settlement(key_id, "orphaned-1")) + "\n")
    # A record that already landed (a crash after settling, before the file was cut).
    assert harness.run(
        harness.gateway.admission.limiter.settle, **_settlement(key_id, "orphaned-1")
    )

    assert harness.run(harness.gateway.ledger.replay) == 2
    assert spool.files() == []
    entries = harness.run(harness.gateway.store.client.xrange, keys_of.usage_key(key_id))
    ids = sorted(json.loads(fields["r"])["request_id"] for _, fields in entries)
    assert ids == ["orphaned-1", "spooled-1"]


def test_a_settlement_that_fails_unexpectedly_is_spooled_and_the_gauge_comes_back(
    harness: Harness,
) -> None:
    record = harness.create_key(credits=5)
    # A corrupted balance: admission reads it as no balance, settlement's HINCRBY fails with
    # a Redis error that is not a connection failure.
    client = harness.gateway.store.client
    harness.run(client.hset, keys_of.record_key(record["id"]), "credits", "not-a-number")
    response = harness.chat(record["key"])
    assert response.status_code == 200, response.text
    spooled = [
        json.loads(line)
        for path in harness.gateway.ledger.spool.files()
        for line in path.read_text().splitlines()
    ]
    assert [entry["request_id"] for entry in spooled] == [response.headers["x-request-id"]]
    metrics = harness.client.get("/metrics").text
    assert "tollgate_inflight_requests 0.0" in metrics
    # Mended, the replay lands it.
    harness.run(client.hset, keys_of.record_key(record["id"]), "credits", "5000000")
    assert harness.run(harness.gateway.ledger.replay) == 1
    assert harness.gateway.ledger.spool.files() == []


def test_spool_files_of_the_first_release_still_replay(harness: Harness) -> None:
    # Written by release 0.1: unversioned lines whose fields were Limiter.settle's arguments.
    fixture = Path(__file__).parent / "fixtures" / "spool-0.1.jsonl"
    spool = harness.gateway.ledger.spool
    spool.directory.mkdir(parents=True, exist_ok=True)
    (spool.directory / "usage-4242.jsonl").write_bytes(fixture.read_bytes())
    assert harness.run(harness.gateway.ledger.replay) == 2
    entries = harness.run(
        harness.gateway.store.client.xrange, keys_of.usage_key("00000000000001a1")
    )
    records = [json.loads(fields["r"]) for _, fields in entries]
    assert [r["request_id"] for r in records] == ["legacy-1", "legacy-2"]
    assert records[1]["cost_usd"] == 0.000123


def test_settlements_round_trip_through_their_versioned_wire_form() -> None:
    from proxy.settlement import SPOOL_VERSION, Settlement

    settlement = Settlement(
        key_id="00000000000001a1", request_id="r-1", ts_ms=1_796_000_000_000,
        day="2026-11-30", model="m|x", prompt_tokens=3, completion_tokens=4, cost_micros=5,
        record_json='{"a":1}',
    )  # fmt: skip
    line = settlement.to_json()
    assert json.loads(line)["v"] == SPOOL_VERSION
    assert Settlement.from_json(json.loads(line)) == settlement
    with pytest.raises(ValueError, match="version"):
        Settlement.from_json({**json.loads(line), "v": 99})
