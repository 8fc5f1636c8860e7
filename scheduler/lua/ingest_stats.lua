-- Record one telemetry message of a worker and drop the reservations it now accounts for.
-- KEYS[1] worker info hash, KEYS[2] worker reservation hash (same hash tag: one slot).
-- ARGV[1] seq, ARGV[2] state, ARGV[3..] alternating field/value pairs, then "--", then the
-- request ids the engine has admitted.
-- seen_ms is Redis's clock, not the worker's: staleness must not depend on host clock skew.
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
local state = redis.call('HGET', KEYS[1], 'state')
-- A restarted worker starts its seq at 1 again; its status message resets 'seq' to -1 then.
if seq <= last then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A worker that said OFFLINE (last-will) stays offline until its status says otherwise.
if state ~= 'offline' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
end
local i = 3
while i <= #ARGV and ARGV[i] ~= '--' do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[1], 'seq', seq, 'seen_ms', now)
i = i + 1
while i <= #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
return 1
