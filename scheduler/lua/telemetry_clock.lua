-- Advance the telemetry clock to Redis time: called every second by each scheduler replica
-- whose ingest is connected to the broker. When the previous tick is older than the gap (the
-- broker was away, or this is the first tick ever) the resume time is set as well.
-- KEYS[1] clock, KEYS[2] resumed-at (one hash tag); ARGV[1] ttl ms, ARGV[2] gap ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
if now - previous > tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], now, 'PX', ttl)
end
redis.call('SET', KEYS[1], now, 'PX', ttl)
return now
