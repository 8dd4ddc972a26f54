-- etcd: POST /v3/kv/put {"key","value"} (base64) with a random key out of KEYS.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done
request = c.request

function init(args)
  c.parse_args(args)
  c.seed()
  c.prepare(function(i)
    local key = c.key(i)
    return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" },
      string.format('{"key":"%s","value":"%s"}', c.base64(key), c.base64(c.value(key, c.value_size))))
  end)
end
