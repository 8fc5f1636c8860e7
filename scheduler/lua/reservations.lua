-- Shared prelude of the scripts that touch a worker's reservations (prepended at load time).
-- A worker's reservations: HASH request id -> tokens, ZSET request id -> expiry (ms), and the
-- running total in its info hash field 'reserved', so checking capacity is O(1), not O(reservations).
-- The three change together in these scripts only, and neither key has a Redis ttl: a key that
-- expired would take its entries with it but leave their tokens in the total, and the worker
-- would look full until it went offline. prune_expired bounds them instead.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drop one reservation; returns the tokens it held (0 if it was not there).
local function drop_reservation(info, resv, expiry, request_id)
  local tokens = tonumber(redis.call('HGET', resv, request_id) or '0')
  if tokens > 0 then
    redis.call('HDEL', resv, request_id)
    redis.call('HINCRBY', info, 'reserved', -tokens)
  end
  redis.call('ZREM', expiry, request_id)
  return tokens
end

-- Drop reservations whose ttl passed (a gateway that died mid-request cannot hold capacity
-- longer than the ttl). Bounded per call; the rest go on the next call.
local function prune_expired(info, resv, expiry, now)
  local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 256)
  for _, request_id in ipairs(expired) do
    drop_reservation(info, resv, expiry, request_id)
  end
  -- No reservations, nothing reserved: heals a total whose hash vanished under it (earlier
  -- versions gave the hash a ttl; a manual DEL does the same).
  if redis.call('EXISTS', resv) == 0 and tonumber(redis.call('HGET', info, 'reserved') or '0') ~= 0 then
    redis.call('HSET', info, 'reserved', 0)
  end
end
