-- Shared prelude of the telemetry scripts (prepended at load time): which process of a worker a
-- message comes from, and what a scheduler-requested drain means for the state it reports.

-- Empty the worker's block set, appending what it held to `into` (the caller unindexes those).
local function drop_block_set(blocks, into)
  for _, block in ipairs(redis.call('SMEMBERS', blocks)) do
    table.insert(into, block)
  end
  redis.call('DEL', blocks)
  return into
end

-- A worker stamps its telemetry with its process start time (its incarnation). Compared with
-- the registry's: -1, an older process (a late last-will, a delayed batch): drop the message;
-- 0, the current process (or a message that does not say); 1, a worker restarted under the same
-- id, adopted here: the new process counts its sequence numbers from 1 and starts with an empty
-- KV cache, and a drain the scheduler requested of the old process does not bind it.
-- Returns the order and the block hashes the old process held (the caller unindexes them).
local function adopt_incarnation(info, blocks, incarnation)
  if incarnation == 0 then
    return 0, {}
  end
  local known = tonumber(redis.call('HGET', info, 'incarnation') or '0')
  if incarnation < known then
    return -1, {}
  end
  if incarnation == known then
    return 0, {}
  end
  redis.call('HSET', info, 'incarnation', incarnation, 'seq', -1, 'kv_seq', -1)
  redis.call('HDEL', info, 'drain_requested')
  return 1, drop_block_set(blocks, {})
end

-- The state to record for the one a worker reports: a drain the scheduler requested holds until
-- the worker restarts, even when the worker never heard of it (its Drain RPC failed).
local function effective_state(info, reported)
  if reported == 'ready' and redis.call('HEXISTS', info, 'drain_requested') == 1 then
    return 'draining'
  end
  return reported
end

-- {applied, pins invalid, block hashes to unindex...}, the reply of every telemetry script.
-- applied: 1 applied, 0 a duplicate or an older seq, -1 from an older process of the worker.
local function telemetry_reply(applied, pins_invalid, blocks)
  table.insert(blocks, 1, pins_invalid)
  table.insert(blocks, 1, applied)
  return blocks
end
