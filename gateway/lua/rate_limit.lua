-- Take tokens from every bucket of one tenant, or from none (the model: gateway/buckets.py `take`).
-- A negative cost gives tokens back (a turn that was charged but never served), never beyond
-- the bucket's capacity.
-- KEYS[1] the tenant's rate HASH (hash-tagged by tenant: one Redis Cluster slot).
-- ARGV[1] now in ms, or '' for the Redis server clock (one clock for every gateway replica);
-- ARGV[2] ms after which an untouched hash may expire (it would be full again by then);
-- then per bucket: name, capacity, refill per ms, cost.
-- Fields: <name>:tokens and <name>:at. Returns {allowed 1/0, retry after ms, limiting bucket
-- index (1-based, 0 when allowed)}. A refused request changes nothing.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = (#ARGV - 2) / 4
local have, costs, names, capacities = {}, {}, {}, {}
local longest, limiting = 0, 0
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local name = ARGV[base + 1]
  local capacity = tonumber(ARGV[base + 2])
  local per_ms = tonumber(ARGV[base + 3])
  local cost = math.min(tonumber(ARGV[base + 4]), capacity)
  local saved = redis.call('HMGET', KEYS[1], name .. ':tokens', name .. ':at')
  local level = capacity
  if saved[1] and saved[2] then
    level = math.min(capacity, tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * per_ms)
  end
  names[i], have[i], costs[i], capacities[i] = name, level, cost, capacity
  if level < cost then
    local wait = math.ceil((cost - level) / per_ms)
    if wait > longest then
      longest, limiting = wait, i
    end
  end
end
if longest > 0 then
  return {0, longest, limiting}
end
for i = 1, n do
  -- %.17g keeps the full double: fractions of a token must not be lost between calls.
  local left = math.min(capacities[i], have[i] - costs[i])
  redis.call('HSET', KEYS[1], names[i] .. ':tokens', string.format('%.17g', left),
    names[i] .. ':at', string.format('%d', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, 0, 0}
