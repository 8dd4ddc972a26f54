-- etcd: POST /v3/kv/put {"key","value"} (base64) with a random key out of KEYS.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local bodies = {}

-- Encoding in Lua per request would make wrk's CPU the bottleneck; precompute per thread.
function init(args)
  c.parse_args(args)
  c.seed()
  for i = 0, c.keys - 1 do
    local key = c.key(i)
    bodies[i] = string.format('{"key":"%s","value":"%s"}', c.base64(key), c.base64(c.value(key, c.value_size)))
  end
end

function request()
  return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" },
    bodies[math.random(0, c.keys - 1)])
end
