-- Reserve KV tokens on one worker, atomically, only if they still fit.
-- KEYS[1] worker info hash, KEYS[2] worker reservation hash (same hash tag: one slot).
-- ARGV[1] request id, ARGV[2] tokens, ARGV[3] reservation ttl ms, ARGV[4] dead-after ms,
-- ARGV[5] "1" if a draining worker may still take it (a pinned session's own turn).
-- Returns {status, free_after}: status 1 reserved, 0 does not fit, -1 unknown worker,
-- -2 not accepting (offline/draining/dead).
-- Reservation values are "tokens:expires_at_ms"; expired ones are dropped here, so a
-- gateway that died mid-request cannot hold capacity for longer than the ttl.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local info = redis.call('HMGET', KEYS[1], 'state', 'block_size', 'blocks_total', 'blocks_used', 'seen_ms')
if not info[1] then
  return {-1, 0}
end
local state = info[1]
if state == 'offline' or (state == 'draining' and ARGV[5] ~= '1') then
  return {-2, 0}
end
if now - tonumber(info[5]) > tonumber(ARGV[4]) then
  return {-2, 0}
end
local free = (tonumber(info[3]) - tonumber(info[4])) * tonumber(info[2])
local reserved = 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local tokens, expires = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if (not tokens) or tonumber(expires) < now then
    redis.call('HDEL', KEYS[2], entries[i])
  elseif entries[i] ~= ARGV[1] then
    reserved = reserved + tonumber(tokens)
  end
end
local want = tonumber(ARGV[2])
if free - reserved < want then
  return {0, free - reserved}
end
redis.call('HSET', KEYS[2], ARGV[1], want .. ':' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
return {1, free - reserved - want}
