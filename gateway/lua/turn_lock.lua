-- Keep alive (ARGV[2] > 0: new ttl in ms) or release (ARGV[2] = 0) a running-turn lock,
-- only if this request (owner token ARGV[1]) still holds it. KEYS[1] the lock.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[2]) > 0 then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('DEL', KEYS[1])
