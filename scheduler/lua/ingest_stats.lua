-- Record one telemetry message of a worker and drop the reservations it now accounts for.
-- KEYS: info hash, reservation hash, reservation expiry zset (one hash tag: one slot).
-- ARGV[1] seq, ARGV[2] state, ARGV[3..] alternating field/value pairs, then "--", then the
-- request ids the engine has admitted.
-- seen_ms is Redis's clock, not the worker's: staleness must not depend on host clock skew.
local info, resv, expiry = KEYS[1], KEYS[2], KEYS[3]
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', info, 'seq') or '-1')
-- A restarted worker starts its seq at 1 again; its READY status resets 'seq' to -1 then.
if seq <= last then
  return 0
end
local now = now_ms()
-- A worker that said OFFLINE (last-will) stays offline until its status says otherwise.
if redis.call('HGET', info, 'state') ~= 'offline' then
  redis.call('HSET', info, 'state', ARGV[2])
end
local i = 3
while i <= #ARGV and ARGV[i] ~= '--' do
  redis.call('HSET', info, ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', info, 'seq', seq, 'seen_ms', now)
for j = i + 1, #ARGV do
  drop_reservation(info, resv, expiry, ARGV[j])
end
prune_expired(info, resv, expiry, now)
return 1
