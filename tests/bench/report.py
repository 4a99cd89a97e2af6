"""The HTTP benchmark's report: one record per wrk run, medians per target, markdown tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
from typing import Any

from tests.bench.load import Load
from tests.servers import REPO

BASELINE = "direct"


def run_record(
    round_: int, target: str, traffic: str, connections: int, load: Load, figures: dict[str, Any]
) -> dict[str, Any]:
    return {
        "round": round_, "target": target, "traffic": traffic, "connections": connections,
        "requests": load.requests, "requests_per_s": round(load.requests_per_s, 1),
        "p50_ms": load.p50_ms, "p90_ms": load.p90_ms, "p99_ms": load.p99_ms,
        "mean_ms": round(load.mean_ms, 3), "socket_errors": load.errors, **figures,
    }  # fmt: skip


def progress(run: dict[str, Any]) -> str:
    redis = run["redis"] or {}
    return (
        f"round {run['round'] + 1} {run['target']:<12} {run['traffic']:<9} "
        f"c={run['connections']:<3} {run['requests_per_s']:>8.0f} req/s "
        f"p50 {run['p50_ms']:.2f} ms p99 {run['p99_ms']:.2f} ms "
        f"cpu {run['proxy_cpu_us_per_request']:.0f} µs/req"
        + (f" redis {redis['round_trips_per_request']} trips/req" if redis else "")
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and traffic: medians over rounds for each connection count."""
    keys = list(dict.fromkeys((r["target"], r["traffic"]) for r in runs))
    connections = sorted({r["connections"] for r in runs})
    out: list[dict[str, Any]] = []
    for target, traffic in keys:
        row: dict[str, Any] = {"target": target, "traffic": traffic}
        mine = [r for r in runs if r["target"] == target and r["traffic"] == traffic]
        for n in connections:
            these = [r for r in mine if r["connections"] == n]
            per: dict[str, Any] = {
                field: round(_median([r[field] for r in these]), 3)
                for field in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms",
                              "proxy_cpu_us_per_request", "wrk_cpu_percent",
                              "machine_busy_percent")
            }  # fmt: skip
            redis = [r["redis"] for r in these if r["redis"]]
            if redis:
                per["redis_cpu_us_per_request"] = _median([x["cpu_us_per_request"] for x in redis])
                for field in ("round_trips_per_request", "script_calls_per_request"):
                    per[f"redis_{field}"] = _median([x[field] for x in redis])
            row[f"c{n}"] = per
        row["rss_per_worker_mib"] = max(r["rss_per_worker_mib"] for r in mine)
        row["rss_total_mib"] = max(r["rss_total_mib"] for r in mine)
        out.append(row)
    for row in out:  # latency added to what the upstream alone takes
        base = next((b for b in out if b["target"] == BASELINE and b["traffic"] == row["traffic"]),
                    None)  # fmt: skip
        for n in connections:
            added = None if base is None else row[f"c{n}"]["p50_ms"] - base[f"c{n}"]["p50_ms"]
            row[f"c{n}"]["added_p50_ms"] = None if added is None else round(added, 3)
    return out


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def table(rows_: list[dict[str, Any]]) -> str:
    head = ("| target | traffic | req/s c32 | p50 / p99 ms c32 | +p50 vs direct c32 | req/s c1 | "
            "p50 / p99 ms c1 | +p50 vs direct c1 | proxy CPU µs/req c32 / c1 | "
            "Redis CPU µs/req c32 | Redis round trips/req | RSS/worker MiB |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_:
        c32, c1 = r["c32"], r["c1"]
        direct = r["target"] == BASELINE
        lines.append(
            f"| {r['target'] + (' (upstream)' if direct else '')} | {r['traffic']} | "
            f"{c32['requests_per_s']:.0f} | {_ms(c32['p50_ms'])} / {_ms(c32['p99_ms'])} | "
            f"{'—' if direct else _ms(c32['added_p50_ms'])} | {c1['requests_per_s']:.0f} | "
            f"{_ms(c1['p50_ms'])} / {_ms(c1['p99_ms'])} | "
            f"{'—' if direct else _ms(c1['added_p50_ms'])} | "
            f"{c32['proxy_cpu_us_per_request']:.0f} / {c1['proxy_cpu_us_per_request']:.0f} | "
            f"{c32.get('redis_cpu_us_per_request', '—')} | "
            f"{c32.get('redis_round_trips_per_request', '—')} | {r['rss_per_worker_mib']} |"
        )
    return "\n".join(lines)


def load_table(rows_: list[dict[str, Any]]) -> str:
    """Who set the pace: wrk near 100 % of a core, or the machine near 100 %, means not the
    target alone."""
    lines = ["| target | traffic | wrk CPU % of a core c32 / c1 | machine busy % (all cores) "
             "c32 / c1 |", "|---|---|---:|---:|"]  # fmt: skip
    for r in rows_:
        lines.append(
            f"| {r['target']} | {r['traffic']} | {r['c32']['wrk_cpu_percent']:.0f} / "
            f"{r['c1']['wrk_cpu_percent']:.0f} | {r['c32']['machine_busy_percent']:.0f} / "
            f"{r['c1']['machine_busy_percent']:.0f} |"
        )
    return "\n".join(lines)


# The streams compared with the chat stream ("stream"): Responses and Anthropic Messages.
_OTHER_STREAMS = ("responses", "messages")


def stream_cpu(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target serving the chat stream and another: proxy CPU per chat stream, per Responses
    stream and per Anthropic Messages stream (medians), and each as a ratio of the chat
    stream's (`responses_ratio`, `messages_ratio`)."""
    by = {(r["target"], r["traffic"]): r for r in rows_}
    out = []
    for target in dict.fromkeys(r["target"] for r in rows_):
        chat = by.get((target, "stream"))
        others = {k: by[(target, k)] for k in _OTHER_STREAMS if (target, k) in by}
        if chat is None or not others or target == BASELINE:
            continue
        entry: dict[str, Any] = {"target": target}
        for n in ("c32", "c1"):
            chat_us = chat[n]["proxy_cpu_us_per_request"]
            figures: dict[str, Any] = {"chat_stream_us": chat_us}
            for traffic, row in others.items():
                us = row[n]["proxy_cpu_us_per_request"]
                figures[f"{traffic}_stream_us"] = us
                figures[f"{traffic}_ratio"] = round(us / chat_us, 3) if chat_us else None
            entry[n] = figures
        out.append(entry)
    return out


def _us(figures: dict[str, Any], field: str) -> str:
    value = figures.get(field)
    return "—" if value is None else f"{value:.0f}"


def stream_cpu_table(entries: list[dict[str, Any]]) -> str:
    lines = ["| target | proxy CPU µs per chat stream c32 / c1 | per Responses stream c32 / c1 "
             "| per Anthropic stream c32 / c1 | Responses ÷ chat c32 / c1 "
             "| Anthropic ÷ chat c32 / c1 |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for e in entries:
        c32, c1 = e["c32"], e["c1"]
        cells = [f"{_us(c32, 'chat_stream_us')} / {_us(c1, 'chat_stream_us')}"]
        for traffic in _OTHER_STREAMS:
            field = f"{traffic}_stream_us"
            cells.append(f"{_us(c32, field)} / {_us(c1, field)}")
        for traffic in _OTHER_STREAMS:
            field = f"{traffic}_ratio"
            cells.append(f"{c32.get(field, '—')} / {c1.get(field, '—')}")
        lines.append(f"| {e['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def environment(nginx: str, wrk: str) -> dict[str, Any]:
    packages = ("starlette", "uvicorn", "httpx", "httptools", "uvloop", "redis", "hiredis",
                "prometheus-client")  # fmt: skip
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    revision = _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "cpus": os.cpu_count(), "python": platform.python_version(), "packages": versions,
        "nginx": _version([nginx, "-v"]), "wrk": _version([wrk, "-v"]),
        "redis": _version(["redis-server", "--version"]), "tollgate_revision": revision,
    }  # fmt: skip
