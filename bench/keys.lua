-- wrk: every request carries a key drawn from the 10,000 in keys.txt.
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE") or "keys.txt") do
  keys[#keys + 1] = line
end
local header = os.getenv("KEY_HEADER") or "Authorization"
local prefix = header == "Authorization" and "Bearer " or ""
local extra = os.getenv("EXTRA_HEADER")
-- SPREAD_CLIENTS=1: every request claims a random client address of 10/8 in X-Forwarded-For
-- (which the gateway believes from a trusted proxy): a flood from many addresses.
local spread = (os.getenv("SPREAD_CLIENTS") or "") ~= ""

-- Each wrk thread runs this file in a Lua state of its own: seeded alike, every thread would
-- send the same sequence of keys. `setup` (in wrk's main state) numbers the threads.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0))
end

request = function()
  local headers = { [header] = prefix .. keys[math.random(#keys)] }
  if extra and extra ~= "" then
    local name, value = extra:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  if spread then
    headers["X-Forwarded-For"] = string.format("10.%d.%d.%d", math.random(0, 255),
      math.random(0, 255), math.random(1, 254))
  end
  return wrk.format("GET", wrk.path, headers)
end
