-- Reserve KV tokens on one worker, atomically, only if they still fit.
-- KEYS: info hash, reservation hash, reservation expiry zset (one hash tag: one slot).
-- ARGV[1] request id, ARGV[2] tokens, ARGV[3] reservation ttl ms, ARGV[4] dead-after ms,
-- ARGV[5] "1" if a draining worker may still take it, ARGV[6] telemetry clock ms (0: none):
-- when it is behind Redis time the broker is away, and ages are measured against it;
-- ARGV[7] telemetry resume time ms (0: none): ages count from no earlier than it.
-- ARGV[8] the request tier's headroom: the fraction of the worker's KV it must leave free for
-- higher tiers (checked here, not only in the policy, so concurrent replicas cannot eat it).
-- Returns {status, free_after}: 1 reserved, 0 does not fit, -1 unknown worker,
-- -2 not accepting (offline/draining/dead).
local info, resv, expiry = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local w = redis.call('HMGET', info, 'state', 'block_size', 'blocks_total', 'blocks_used', 'seen_ms')
if not w[1] then
  return {-1, 0}
end
if w[1] == 'offline' or (w[1] == 'draining' and ARGV[5] ~= '1') then
  return {-2, 0}
end
local clock = tonumber(ARGV[6] or '0')
local age_now = now
if clock > 0 and clock < now then
  age_now = clock
end
if age_now - math.max(tonumber(w[5]), tonumber(ARGV[7] or '0')) > tonumber(ARGV[4]) then
  return {-2, 0}
end
prune_expired(info, resv, expiry, now)
-- A retried request (same id) replaces its own reservation instead of adding a second one.
drop_reservation(info, resv, expiry, ARGV[1])
local reserved = tonumber(redis.call('HGET', info, 'reserved') or '0')
local capacity = tonumber(w[3]) * tonumber(w[2])
local free = capacity - tonumber(w[4]) * tonumber(w[2]) - reserved
local want = tonumber(ARGV[2])
if free - tonumber(ARGV[8] or '0') * capacity < want then
  return {0, free}
end
local ttl = tonumber(ARGV[3])
redis.call('HSET', resv, ARGV[1], want)
redis.call('ZADD', expiry, now + ttl, ARGV[1])
redis.call('HINCRBY', info, 'reserved', want)
return {1, free - want}
