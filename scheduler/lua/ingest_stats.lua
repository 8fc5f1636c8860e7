-- Record one telemetry message of a worker and drop the reservations it now accounts for.
-- KEYS: info hash, reservation hash, reservation expiry zset, block set (one hash tag: one slot).
-- ARGV[1] seq, ARGV[2] state, ARGV[3] incarnation, ARGV[4] block set ttl ms, ARGV[5..]
-- alternating field/value pairs, then "--", then the request ids whose prompt KV the engine holds.
-- seen_ms is Redis's clock, not the worker's: staleness must not depend on host clock skew.
-- Returns telemetry_reply: pins are invalid when this message revealed a restart.
local info, resv, expiry, blocks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local order, held = adopt_incarnation(info, blocks, tonumber(ARGV[3]))
if order < 0 then
  return telemetry_reply(-1, 0, {})
end
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', info, 'seq') or '-1')
-- A worker that does not report its incarnation starts its seq at 1 again when it restarts; its
-- READY status resets 'seq' to -1 then.
if seq <= last then
  return telemetry_reply(0, 0, held)
end
local now = now_ms()
-- A worker that said OFFLINE (last-will) stays offline until its status says otherwise, unless
-- this message comes from a new process of it.
if order == 1 or redis.call('HGET', info, 'state') ~= 'offline' then
  redis.call('HSET', info, 'state', effective_state(info, ARGV[2]))
end
local i = 5
while i <= #ARGV and ARGV[i] ~= '--' do
  redis.call('HSET', info, ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', info, 'seq', seq, 'seen_ms', now)
for j = i + 1, #ARGV do
  drop_reservation(info, resv, expiry, ARGV[j])
end
prune_expired(info, resv, expiry, now)
-- The worker's block set lives as long as the worker reports, however long since its last KV event.
if redis.call('EXISTS', blocks) == 1 then
  redis.call('PEXPIRE', blocks, tonumber(ARGV[4]))
end
return telemetry_reply(1, order, held)
