-- Claim an idempotency key for a turn about to run.
-- KEYS[1] idempotency hash (key -> turn index), KEYS[2] the key's running-turn lock.
-- ARGV[1] idempotency key, ARGV[2] owner token, ARGV[3] lock ttl ms.
-- Returns {"stored", index} when the turn is already stored, {"running", -1} when another
-- request holds the lock, {"claimed", -1} when this request now holds it.
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  return {'stored', tonumber(stored)}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'claimed', -1}
end
return {'running', -1}
