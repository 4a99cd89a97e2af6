"""The soak run's verdicts (errors, leaked slots, reservations and sockets, memory growth, one
usage record per request) and its markdown summary, both from the figures the run recorded.
"""

from __future__ import annotations

from typing import Any

RSS_GROWTH_LIMIT = 0.10  # RSS at the end of phase 2 may exceed its after-warm-up level by this
# "Near idle": every socket but the Redis pool's is back, give or take this many. Upstream
# keep-alive connections close after 5 s idle (proxy/http1.py's keepalive_expiry), client ones
# when the load generator closes them. The Redis pool is reported apart: redis-py's asyncio pool
# keeps every connection it opened (no idle timeout).
SOCKET_SLACK = 2


def kept(sockets: dict[str, int]) -> int:
    """Sockets that must return to their idle number: all but the Redis pool's."""
    return sockets["total"] - sockets["redis"]


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


def checks(
    phases: dict[str, dict[str, Any]],
    *,
    idle: dict[str, Any],
    end: dict[str, Any],
    warm: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Every verdict of the run; `phases` maps a phase's name to its figures."""
    errors = {name: p["error_count"] for name, p in phases.items()}
    final = list(phases.values())[-1]["store_after_drain"]
    idle_kept, end_kept = kept(idle["sockets"]), kept(end["sockets"])
    found = [
        _check("no errors", sum(errors.values()) == 0,
               f"non-2xx answers, client exceptions, short bodies, unfinished: {errors}"),
        _check("in-flight gauges back to 0", all(p["drained"] for p in phases.values()),
               "tollgate_inflight_requests and tollgate_active_streams after each phase"),
        _check("no leaked concurrency slots", final["leaked_slots"] == 0,
               f"{final['leaked_slots']} entries left in the tollgate:inflight:{{id}} zsets"),
        _check("no leaked credit reservations",
               final["reservations"] == 0 and final["reserved_micros"] == 0,
               f"{final['reservations']} entries left in tollgate:reserved:{{id}}; "
               f"reserved = {final['reserved_micros']} micro-dollars"),
        _check("sockets back near idle", end_kept <= idle_kept + SOCKET_SLACK,
               f"all but the Redis pool's: idle {idle_kept}, end {end_kept} (at most "
               f"+{SOCKET_SLACK}), {end['settle_s']} s after the drain; end {end['sockets']}"),
    ]  # fmt: skip
    if warm is not None:
        last = phases["phase2"]["rss_mib"]["end"]
        growth = (last - max(warm["rss_mib"])) / max(warm["rss_mib"])
        found.append(_check(
            "RSS growth after warm-up", growth < RSS_GROWTH_LIMIT,
            f"{max(warm['rss_mib'])} MiB {warm['t_s']} s into phase 2 -> {last} MiB at its end: "
            f"{100 * growth:+.1f} % (limit {100 * RSS_GROWTH_LIMIT:.0f} %)",
        ))  # fmt: skip
    for name, p in phases.items():
        found.append(_check(
            f"{name}: one usage record per request",
            p["usage_records"] == p["completed"] + p["aborted"],
            f"{p['usage_records']} records written; {p['completed']} completed + {p['aborted']} "
            "cut after their answer began",
        ))  # fmt: skip
    return found


def _latency(latency: dict[str, Any] | None) -> str:
    return "—" if latency is None else f"{latency['p50']:.1f} / {latency['p99']:.1f}"


def _sockets(peak: dict[str, int]) -> str:
    return (f"{peak.get('total')} (client {peak.get('client')}, upstream {peak.get('upstream')}, "
            f"Redis {peak.get('redis')})")  # fmt: skip


def _store(p: dict[str, Any], *fields: str) -> str:
    return " / ".join(str(p["store_after_drain"][f]) for f in fields)


def summary(result: dict[str, Any]) -> str:
    """The run as markdown: one column per phase, then the checks."""
    s, p1, p2 = result["settings"], result["phase1"], result["phase2"]
    idle, end, warm = result["idle"], result["end"], result["warm"]
    warm_rss = f"{max(warm['rss_mib'])} ({warm['t_s']} s in)" if warm else "—"
    l1, l2 = p1["latency_ms"], p2["latency_ms"]
    rows = [
        ("load", f"{s['streams']} slow streams held open (~{s['slow_stream_s']:.0f} s each)",
         f"{p2['target_requests_per_s']:.0f} req/s offered = {100 * s['load_fraction']:.0f} % "
         f"of {p2['maximum_requests_per_s']:.0f} (mix maximum, wrk, 32 conns); 80 % json, 20 % "
         "fast streams"),
        ("duration s", p1["duration_s"], p2["duration_s"]),
        ("streams / requests done", f"{p1['completed']} completed + {p1['aborted']} cut at the end",
         f"{p2['completed']} completed; {p2['dropped']} arrivals dropped"),
        ("req/s done", p1["requests_per_s"], p2["requests_per_s"]),
        ("bytes received", p1["received_bytes"], p2["received_bytes"]),
        ("errors", f"{p1['error_count']} {p1['errors'] or ''}",
         f"{p2['error_count']} {p2['errors'] or ''}"),
        ("latency p50 / p99 ms", f"whole slow stream {_latency(l1.get('slow'))}",
         f"json {_latency(l2.get('json'))}; fast stream {_latency(l2.get('stream'))}"),
        ("streams open in the generator / Tollgate, peak",
         f"{p1['open_streams_peak']} / {p1['active_streams_peak']}",
         f"— / {p2['active_streams_peak']}"),
        ("RSS MiB start / after warm-up / end (peak)",
         f"{p1['rss_mib']['start']} / — / {p1['rss_mib']['end']} ({p1['rss_mib']['peak']})",
         f"{p2['rss_mib']['start']} / {warm_rss} / {p2['rss_mib']['end']} "
         f"({p2['rss_mib']['peak']})"),
        ("sockets idle", _sockets(idle["sockets"]), ""),
        ("sockets peak", _sockets(p1["sockets_peak"]), _sockets(p2["sockets_peak"])),
        ("sockets after drain", _sockets(p1["sockets_end"]),
         f"{_sockets(end['sockets'])}, {end['settle_s']} s after the drain"),
        ("Redis connected_clients idle / peak / end",
         f"{idle['redis_clients']} / {p1['redis_clients_peak']} / {p1['redis_clients_end']}",
         f"— / {p2['redis_clients_peak']} / {end['redis_clients']}"),
        ("leaked slots", _store(p1, "leaked_slots"), _store(p2, "leaked_slots")),
        ("leaked reservations (entries / micro-dollars)",
         _store(p1, "reservations", "reserved_micros"),
         _store(p2, "reservations", "reserved_micros")),
        ("usage records / requests that reached upstream",
         f"{p1['usage_records']} / {p1['completed'] + p1['aborted']}",
         f"{p2['usage_records']} / {p2['completed'] + p2['aborted']}"),
        ("answered by status (tollgate_requests_total)", p1["answered_by_status"],
         p2["answered_by_status"]),
        ("CPU % of a core: Tollgate / this generator; machine busy % (all cores)",
         f"{p1['tollgate_cpu_percent']} / {p1['generator_cpu_percent']}; "
         f"{p1['machine_busy_percent']}",
         f"{p2['tollgate_cpu_percent']} / {p2['generator_cpu_percent']}; "
         f"{p2['machine_busy_percent']}"),
    ]  # fmt: skip
    lines = ["| figure | phase 1: slow streams | phase 2: mixed load |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'ok' if c['ok'] else 'FAILED'} | {c['detail']} |"
              for c in result["checks"]]  # fmt: skip
    return "\n".join(lines)
