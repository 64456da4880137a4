-- wrk: every request carries a key drawn from the 10,000 in keys.txt.
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE") or "keys.txt") do
  keys[#keys + 1] = line
end
local header = os.getenv("KEY_HEADER") or "Authorization"
local prefix = header == "Authorization" and "Bearer " or ""
local extra = os.getenv("EXTRA_HEADER")
math.randomseed(os.time())

request = function()
  local headers = { [header] = prefix .. keys[math.random(#keys)] }
  if extra and extra ~= "" then
    local name, value = extra:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  return wrk.format("GET", wrk.path, headers)
end
