-- Apply one batch of a worker's KV block events to its block set.
-- KEYS[1] worker info hash, KEYS[2] worker block set (same hash tag: one slot).
-- ARGV[1] batch seq, ARGV[2] "1" if the worker cleared its whole cache, ARGV[3] set ttl ms,
-- ARGV[4] incarnation, ARGV[5] number of stored hashes n, ARGV[6..5+n] stored hashes, the rest
-- removed hashes.
-- Every scheduler replica ingests every batch; the seq check makes a late duplicate a no-op,
-- so replicas cannot re-add a block that a newer batch removed.
-- Returns telemetry_reply with the hashes dropped by a clear or a restart: the caller mirrors
-- the batch into the block -> workers index.
local order, dropped = adopt_incarnation(KEYS[1], KEYS[2], tonumber(ARGV[4]))
if order < 0 then
  return telemetry_reply(-1, 0, {})
end
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'kv_seq') or '-1')
if seq <= last then
  return telemetry_reply(0, 0, dropped)
end
redis.call('HSET', KEYS[1], 'kv_seq', seq)
if ARGV[2] == '1' then
  drop_block_set(KEYS[2], dropped)
end
local n = tonumber(ARGV[5])
local i = 6
while i < 6 + n do
  redis.call('SADD', KEYS[2], ARGV[i])
  i = i + 1
end
while i <= #ARGV do
  redis.call('SREM', KEYS[2], ARGV[i])
  i = i + 1
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
end
return telemetry_reply(1, order, dropped)
