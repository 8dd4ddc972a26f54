-- distkv: PUT /v1/kv/{key} with a random key out of KEYS and a VALUE_SIZE-byte body.
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
    return wrk.format("PUT", "/v1/kv/" .. key, nil, c.value(key, c.value_size))
  end)
end
