-- Append one finished turn to a session, at most once per idempotency key.
-- KEYS[1] turns list, KEYS[2] meta hash, KEYS[3] idempotency hash (key -> turn index),
-- KEYS[4] the key's running-turn lock (all share the session's hash tag).
-- ARGV[1] serialized Turn, ARGV[2] updated_ms, ARGV[3] idle ttl ms, ARGV[4] idempotency key or "".
-- Returns the turn's index; a key already stored returns its turn's index and appends nothing.
local key = ARGV[4]
if key ~= '' then
  local stored = redis.call('HGET', KEYS[3], key)
  if stored then
    return tonumber(stored)
  end
end
local index = redis.call('RPUSH', KEYS[1], ARGV[1]) - 1
redis.call('HSET', KEYS[2], 'updated_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if key ~= '' then
  redis.call('HSET', KEYS[3], key, index)
  redis.call('DEL', KEYS[4])
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return index
