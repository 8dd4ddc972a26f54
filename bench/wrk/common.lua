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

function M.random_key()
  return M.key(math.random(0, M.keys - 1))
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
