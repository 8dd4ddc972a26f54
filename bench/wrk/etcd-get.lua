-- etcd: POST /v3/kv/range {"key"} (base64) with a random key out of KEYS; linearizable reads.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local bodies = {}

function init(args)
  c.parse_args(args)
  c.seed()
  for i = 0, c.keys - 1 do
    bodies[i] = string.format('{"key":"%s"}', c.base64(c.key(i)))
  end
end

function request()
  return wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" },
    bodies[math.random(0, c.keys - 1)])
end
