-- etcd: POST /v3/kv/range {"key"} (base64) with a random key out of KEYS; linearizable reads.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done
request = c.request

function init(args)
  c.parse_args(args)
  c.seed()
  c.prepare(function(i)
    return wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" },
      string.format('{"key":"%s"}', c.base64(c.key(i))))
  end)
end
