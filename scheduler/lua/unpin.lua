-- Drop a session's pin if it still names the worker (another replica may have moved it since).
-- KEYS[1] the session's pin; ARGV[1] worker id. Returns 1 if dropped.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
