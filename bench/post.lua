-- wrk script: POST one embeddings request per call and print the results as one JSON line.
-- Environment: BENCH_PATH (default /v1/embeddings), BENCH_BODY (JSON body), BENCH_AUTH (bearer key).
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/embeddings"
wrk.body = os.getenv("BENCH_BODY") or '{"model": "bench-embed", "input": "hello world"}'
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

function done(summary, latency, requests)
  local e = summary.errors
  -- latency is in microseconds; report milliseconds
  local function ms(us) return string.format("%.4f", us / 1000.0) end
  io.write("BENCH_JSON {")
  io.write(string.format('"requests": %d, "duration_us": %d, "bytes": %d, ', summary.requests, summary.duration, summary.bytes))
  io.write(string.format('"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ',
    e.status, e.connect, e.read, e.write, e.timeout))
  io.write(string.format('"p50_ms": %s, "p90_ms": %s, "p99_ms": %s, "p999_ms": %s, "mean_ms": %s, "max_ms": %s, "stdev_ms": %s',
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency:percentile(99.9)), ms(latency.mean), ms(latency.max), ms(latency.stdev)))
  io.write("}\n")
end
