-- Shared by the wrk scripts in this directory: key/value shapes, a per-thread id and a
-- machine-readable result line that bench/lib.sh turns into the table.
--
-- Script arguments (after `--` on the wrk command line): KEYS VALUE_SIZE

local M = {}

M.keys = 10000
M.value_size = 100

-- Same names as distkv-loadtest (loadtest/src/keys.rs), so its prefill makes GETs hit.
function M.key(i)
  return string.format("key-%08d", i)
end

function M.value(key, size)
  local v = key .. "|" .. string.rep("x", size)
  return v:sub(1, size)
end

function M.parse_args(args)
  M.keys = tonumber(args[1] or M.keys)
  M.value_size = tonumber(args[2] or M.value_size)
end

local threads = {}
local counter = 0

-- Give every thread a distinct id and random seed; setup runs in the main Lua state.
function M.setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function M.seed()
  math.randomseed(os.time() * 1000 + (id or 0))
end

-- Requests are formatted once per thread, in a random order, and then sent in a cycle:
-- wrk shares the cores with the system it measures, and formatting each request anew
-- was about a sixth of wrk's CPU (14.7 against 12.4 us per GET). At most this many per
-- thread; with more keys than that, a random sample of them.
local MAX_PREPARED = 100000

-- Fills the thread's cycle with make(i) for key numbers i; call from init after seed().
function M.prepare(make)
  local reqs = {}
  local n = math.min(M.keys, MAX_PREPARED)
  for j = 1, n do
    reqs[j] = make(M.keys <= MAX_PREPARED and j - 1 or math.random(0, M.keys - 1))
  end
  for j = n, 2, -1 do
    local k = math.random(j)
    reqs[j], reqs[k] = reqs[k], reqs[j]
  end
  M.reqs, M.next = reqs, 0
end

-- The next prepared request; scripts use it as wrk's request().
function M.request()
  M.next = M.next % #M.reqs + 1
  return M.reqs[M.next]
end

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- etcd's JSON gateway wants base64 keys and values.
function M.base64(data)
  return ((data:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

-- One line for bench/lib.sh: requests, seconds, req/s, p50 and p99 in ms, errors.
function M.done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    "RESULT requests=%d secs=%.2f rps=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d status_errors=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, errors, e.status))
end

return M
