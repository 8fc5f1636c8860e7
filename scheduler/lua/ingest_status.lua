-- Record a worker's lifecycle status (retained; OFFLINE is its MQTT last-will).
-- KEYS: info hash, reservation hash, reservation expiry zset, block set (one hash tag: one slot).
-- ARGV[1] state, ARGV[2] incarnation, ARGV[3..] alternating field/value pairs.
-- Returns telemetry_reply: pins are invalid when the worker went offline or restarted.
local info, resv, expiry, blocks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local incarnation = tonumber(ARGV[2])
local order, held = adopt_incarnation(info, blocks, incarnation)
if order < 0 then
  return telemetry_reply(-1, 0, {})
end
local state = ARGV[1]
-- Pins are invalidated once: by the replica whose script saw the restart or the transition to
-- offline (every replica ingests every status).
local pins_invalid = order
if state == 'offline' then
  -- Its KV cache is gone with it: reservations and cached prefixes mean nothing now.
  if redis.call('HGET', info, 'state') ~= 'offline' then
    pins_invalid = 1
  end
  drop_block_set(blocks, held)
  redis.call('DEL', resv, expiry)
  redis.call('HSET', info, 'reserved', 0, 'state', 'offline')
else
  if state == 'ready' and incarnation == 0 then
    -- A worker that does not report its incarnation (an older version) counts its telemetry
    -- from 1 again after a restart, and says READY then: the only restart sign it gives.
    redis.call('HSET', info, 'seq', -1)
    redis.call('HDEL', info, 'drain_requested')
  end
  redis.call('HSET', info, 'state', effective_state(info, state))
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', info, ARGV[i], ARGV[i + 1])
end
return telemetry_reply(1, pins_invalid, held)
