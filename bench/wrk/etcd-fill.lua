-- etcd: writes keys 0..KEYS-1 once each (thread t of THREADS takes t, t+THREADS, ...) and
-- stops the thread once that many writes were acknowledged. Acks arrive out of order, so a
-- key can still be in flight then: bench/etcd.sh counts the keys afterwards and refills.
-- wrk still waits out -d, so keep -d short. Arguments: KEYS VALUE_SIZE THREADS
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup

done = c.done

local next_i, acked, share, step

function init(args)
  c.parse_args(args)
  step = tonumber(args[3])
  next_i = id
  share = 0
  for i = id, c.keys - 1, step do share = share + 1 end
  acked = 0
end

function request()
  local i = next_i
  -- Past the end (more connections than keys left), rewrite the thread's first key.
  if i >= c.keys then i = id else next_i = next_i + step end
  local key = c.key(i)
  return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" },
    string.format('{"key":"%s","value":"%s"}', c.base64(key), c.base64(c.value(key, c.value_size))))
end

function response(status)
  if status == 200 then acked = acked + 1 end
  if acked >= share then wrk.thread:stop() end
end
