-- Drain a worker from the scheduler's side. KEYS[1] its info hash.
-- The request holds until the worker restarts (incarnation.lua's effective_state), even if the
-- worker never hears of it; the state changes only from ready: an offline worker stays offline.
-- Returns 0 for an unknown worker, else 1.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'drain_requested', 1)
if redis.call('HGET', KEYS[1], 'state') == 'ready' then
  redis.call('HSET', KEYS[1], 'state', 'draining')
end
return 1
