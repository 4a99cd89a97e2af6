-- wrk script of the HTTP benchmark (tests/bench/load.py): POSTs the chat body read from
-- BENCH_BODY_FILE with BENCH_AUTHORIZATION; BENCH_STREAM_HEADER, when set, is sent with value 1.
-- done() prints one line "BENCH_RESULT {json}" with counts and latency percentiles in µs.

local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTHORIZATION")
local stream_header = os.getenv("BENCH_STREAM_HEADER") or ""
if stream_header ~= "" then
  wrk.headers[stream_header] = "1"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
