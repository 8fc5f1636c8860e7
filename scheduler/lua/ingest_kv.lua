-- Apply one batch of a worker's KV block events to its prefix index.
-- KEYS[1] worker info hash, KEYS[2] worker block set (same hash tag: one slot).
-- ARGV[1] batch seq, ARGV[2] "1" if the worker cleared its whole cache, ARGV[3] index ttl ms,
-- ARGV[4] number of stored hashes n, ARGV[5..4+n] stored hashes, the rest removed hashes.
-- Every scheduler replica ingests every batch; the seq check makes a late duplicate a no-op,
-- so replicas cannot re-add a block that a newer batch removed.
-- Returns {0} for a duplicate, else {1, hashes dropped by a full clear...}: the caller mirrors
-- the batch into the block -> workers index.
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'kv_seq') or '-1')
if seq <= last then
  return {0}
end
redis.call('HSET', KEYS[1], 'kv_seq', seq)
local cleared = {}
if ARGV[2] == '1' then
  cleared = redis.call('SMEMBERS', KEYS[2])
  redis.call('DEL', KEYS[2])
end
local n = tonumber(ARGV[4])
local i = 5
while i < 5 + n do
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
table.insert(cleared, 1, 1)
return cleared
