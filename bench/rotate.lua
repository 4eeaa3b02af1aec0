-- wrk script for the heartbeat benchmark: each request is a POST to the next target of the file
-- named by $BENCH_TARGETS (lines "PATH<TAB>TOKEN"), with the token as a Bearer header. Threads
-- start at different offsets so that they do not hit the same event at once. At the end one JSON
-- line with the summary and latency percentiles (milliseconds) is printed.

local counter = 0
local threads = {}

function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local requests = {}
local index = 1

function init(args)
  for line in io.lines(os.getenv("BENCH_TARGETS")) do
    local path, token = line:match("^([^\t]*)\t?(.*)$")
    local headers = { ["Content-Type"] = "application/json" }
    if token ~= nil and token ~= "" then
      headers["Authorization"] = "Bearer " .. token
    end
    table.insert(requests, wrk.format("POST", path, headers, "{}"))
  end
  index = (offset * 7919) % #requests + 1
end

function request()
  local r = requests[index]
  index = index % #requests + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({ 50, 90, 99, 99.9 }) do
    table.insert(p, string.format('"%s": %.3f', tostring(q), latency:percentile(q) / 1000))
  end
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "latency_ms": {%s}, "latency_ms_max": %.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(p, ", "), latency.max / 1000))
end
