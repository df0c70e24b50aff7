-- wrk script: POST one embeddings request per call; at the end print the results as one JSON line
-- ("BENCH_JSON {...}"): counts, socket errors, latency percentiles (ms), status codes, and the
-- first non-2xx answer (cut short) to tell what went wrong.
-- Environment: BENCH_PATH (default /v1/embeddings), BENCH_BODY (JSON body), BENCH_AUTH (bearer key),
-- BENCH_HEADER (one more header, "Name: value").
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/embeddings"
wrk.body = os.getenv("BENCH_BODY") or '{"model": "bench-embed", "input": "hello world"}'
wrk.headers["Content-Type"] = "application/json"
local header = os.getenv("BENCH_HEADER")  -- one extra header, "Name: value"
if header and header ~= "" then
  local name, value = string.match(header, "^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

-- per-thread state (globals, read back with thread:get in done())
statuses = {}
first_error = ""

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if (status < 200 or status > 299) and first_error == "" then
    first_error = tostring(status) .. " " .. string.sub(body or "", 1, 300)
  end
end

local function json_string(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

function done(summary, latency, requests)
  local e = summary.errors
  local function ms(us) return string.format("%.4f", us / 1000.0) end
  local total, err = {}, ""
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses") or {}) do
      total[code] = (total[code] or 0) + n
    end
    local fe = t:get("first_error")
    if err == "" and fe and fe ~= "" then err = fe end
  end
  local parts = {}
  for code, n in pairs(total) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  io.write("BENCH_JSON {")
  io.write(string.format('"requests": %d, "duration_us": %d, "bytes": %d, ', summary.requests, summary.duration, summary.bytes))
  io.write(string.format('"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ',
    e.status, e.connect, e.read, e.write, e.timeout))
  io.write(string.format('"p50_ms": %s, "p90_ms": %s, "p99_ms": %s, "p999_ms": %s, "mean_ms": %s, "max_ms": %s, "stdev_ms": %s, ',
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency:percentile(99.9)), ms(latency.mean), ms(latency.max), ms(latency.stdev)))
  io.write('"statuses": {' .. table.concat(parts, ", ") .. '}, "first_error": ' .. json_string(err))
  io.write("}\n")
end
