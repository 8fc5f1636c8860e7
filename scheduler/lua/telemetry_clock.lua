-- Advance the telemetry clock to Redis time: called every second by each scheduler replica
-- whose ingest is connected to the broker. KEYS[1] clock key; ARGV[1] ttl ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now, 'PX', tonumber(ARGV[1]))
return now
