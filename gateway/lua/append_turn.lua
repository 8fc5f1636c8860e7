-- Append one finished turn to a session, at most once per turn id, and only while the session exists.
-- KEYS[1] turns list, KEYS[2] meta hash, KEYS[3] turn ids hash (turn id -> turn index),
-- KEYS[4] the turn id's running-turn lock (all share the session's hash tag).
-- ARGV[1] serialized Turn, ARGV[2] updated_ms, ARGV[3] idle ttl ms, ARGV[4] turn id: the client's
-- idempotency key, or one the gateway made for this turn. Never empty: a client retries a command
-- whose reply timed out (it may have been applied), and the retry must find the turn stored.
-- Returns the turn's index (an id already stored returns its turn's index and appends nothing),
-- or -1 when the session is gone (deleted, or expired by its idle ttl): nothing is written, so a
-- turn still running when its session was deleted cannot bring the session back.
local stored = redis.call('HGET', KEYS[3], ARGV[4])
if stored then
  return tonumber(stored)
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local index = redis.call('RPUSH', KEYS[1], ARGV[1]) - 1
redis.call('HSET', KEYS[2], 'updated_ms', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[4], index)
redis.call('DEL', KEYS[4])
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return index
