-- Claim an idempotency key for a turn about to run.
-- KEYS[1] idempotency hash (key -> turn index), KEYS[2] the key's running-turn lock.
-- ARGV[1] idempotency key, ARGV[2] owner token (new per request), ARGV[3] lock ttl ms.
-- Returns {"stored", index} when the turn is already stored, {"running", -1} when another
-- request holds the lock, {"claimed", -1} when this request now holds it.
-- Retry-safe: the Redis client sends a command whose reply timed out again, and the first send
-- may have been applied. A lock holding this request's own token is its own claim, not another
-- request's: claimed again (its ttl renewed), never "running".
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  return {'stored', tonumber(stored)}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'claimed', -1}
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'claimed', -1}
end
return {'running', -1}
