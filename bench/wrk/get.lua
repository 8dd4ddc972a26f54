-- distkv: GET /v1/kv/{key} with a random key out of KEYS (prefill first, or 404s count as errors).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

function init(args)
  c.parse_args(args)
  c.seed()
end

function request()
  return wrk.format("GET", "/v1/kv/" .. c.random_key())
end
