-- wrk script for benches/load.sh: every request is `GET /` with an `x-api-key` header taken
-- in turn from a key list (one key per line; the file is the argument after `--`).
--
-- All requests are built once in init(), so request() is a table lookup: the client does the
-- same, cheap work for every target (also the direct one, which just ignores the header).
-- done() prints one machine-readable line that load.sh parses:
--   WRK_RESULT requests=… duration_us=… sent=… non2xx=… connect_err=… read_err=… write_err=…
--              timeout_err=… p50_us=… p99_us=… p999_us=… max_us=…
-- `requests` are completed responses; `sent` counts request() calls, i.e. requests written,
-- including those still in flight when wrk stopped (so the server may have seen up to
-- `sent`, at least `requests`). `non2xx` is wrk's count of statuses above 399.

local requests = {}
local count = 0
local next_index = 0
sent = 0 -- global: done() reads it from each thread with thread:get()

function init(args)
   local path = args[1]
   assert(path, "usage: wrk … -s keys.lua URL -- KEY_LIST_FILE")
   local host = wrk.headers["Host"]
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         requests[count] = wrk.format("GET", "/", { ["Host"] = host, ["x-api-key"] = line })
      end
   end
   assert(count > 0, "no keys in " .. path)
end

function request()
   next_index = next_index % count + 1
   sent = sent + 1
   return requests[next_index]
end

local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
end

function done(summary, latency, _)
   local total_sent = 0
   for _, thread in ipairs(threads) do
      total_sent = total_sent + (thread:get("sent") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      "WRK_RESULT requests=%d duration_us=%d sent=%d non2xx=%d connect_err=%d read_err=%d " ..
      "write_err=%d timeout_err=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d\n",
      summary.requests, summary.duration, total_sent, e.status, e.connect, e.read,
      e.write, e.timeout, latency:percentile(50), latency:percentile(99),
      latency:percentile(99.9), latency.max))
end
