-- distkv: GET /v1/kv/{key} with a random key out of KEYS (prefill first, or 404s count as errors).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done
request = c.request

function init(args)
  c.parse_args(args)
  c.seed()
  c.prepare(function(i) return wrk.format("GET", "/v1/kv/" .. c.key(i)) end)
end
