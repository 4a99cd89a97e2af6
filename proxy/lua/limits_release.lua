-- Release one admission that never reached the upstream (its reply was lost), in one round
-- trip: no charge and no usage record. Idempotent, and a no-op for an id that was never
-- admitted or was already settled or released.
--
-- KEYS[1]  key record hash     tollgate:key:{id}         rpm, tpm, reserved, budget_reserved,
--                                                        budget_start
-- KEYS[2]  bucket hash         tollgate:bucket:{id}      r (requests level), t (tokens level)
-- KEYS[3]  in-flight zset      tollgate:inflight:{id}    request id -> lease expiry (ms)
-- KEYS[4]  reservations hash   tollgate:reserved:{id}    request id -> "micros:tokens:<marker>",
--                                                        "<request id>|x" -> "<budget micros>:
--                                                        <period start ms>:<model pattern>"
-- KEYS[5]  settled zset        tollgate:settled:{id}     request id -> settle time (ms)
-- ARGV[1]  request id
-- ARGV[2]  settled-id retention in ms (as for settlement)
--
-- Gives back what admission took: the concurrency slot, the credit reservation, the token
-- estimate and the request's token in the requests bucket (the request was never served, and
-- its client is told to retry, so the retry should not pay twice). Levels are capped at
-- capacity when admission reads them, so a refund never lifts a bucket past full.
-- The id joins the settled set, so a later settlement or sweep of it does nothing. An id with
-- no admission left is not added: if its admission is still on the way, the sweeper settles it.
-- Returns 1 when an admission was released now, 0 when there was none to release.

local record_key, bucket_key, inflight_key, reserved_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local settled_key = KEYS[5]
local request_id = ARGV[1]
local retention_ms = tonumber(ARGV[2])

if redis.call('ZSCORE', settled_key, request_id) then
  return 0
end
local reservation = redis.call('HGET', reserved_key, request_id)
local held = redis.call('ZREM', inflight_key, request_id)
if not reservation and held == 0 then
  return 0
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', settled_key, now, request_id)
redis.call('ZREMRANGEBYSCORE', settled_key, '-inf', now - retention_ms)

local estimate
if reservation then
  redis.call('HDEL', reserved_key, request_id)
  local micros, tokens = string.match(reservation, '^(%-?%d+):(%-?%d+):')
  micros, estimate = tonumber(micros), tonumber(tokens)
  local rec = redis.call('HMGET', record_key, 'rpm', 'tpm')
  local bucket = redis.call('HMGET', bucket_key, 'r', 't')
  -- A deleted key is not brought back as a record holding only "reserved".
  if micros and micros ~= 0 and redis.call('EXISTS', record_key) == 1 then
    redis.call('HINCRBY', record_key, 'reserved', -micros)
  end
  -- Only a level admission wrote is refunded: a missing one reads as a full bucket already.
  if rec[1] and bucket[1] then
    redis.call('HINCRBYFLOAT', bucket_key, 'r', 1)
  end
  if estimate and estimate ~= 0 and rec[2] and bucket[2] then
    redis.call('HINCRBYFLOAT', bucket_key, 't', estimate)
  end
end
local extra_field = request_id .. '|x'
local extra = redis.call('HGET', reserved_key, extra_field)
if extra then
  redis.call('HDEL', reserved_key, extra_field)
  local held, start, glob = string.match(extra, '^(%-?%d+):(%d*):(.*)$')
  if start and start ~= '' and start == redis.call('HGET', record_key, 'budget_start') then
    redis.call('HINCRBY', record_key, 'budget_reserved', -tonumber(held))
  end
  -- The model's buckets get back what admission took, as the key's do.
  if glob and glob ~= '' then
    local prefix = 'm|' .. glob .. '|'
    if redis.call('HEXISTS', bucket_key, prefix .. 'r') == 1 then
      redis.call('HINCRBYFLOAT', bucket_key, prefix .. 'r', 1)
    end
    if estimate and estimate ~= 0 and redis.call('HEXISTS', bucket_key, prefix .. 't') == 1 then
      redis.call('HINCRBYFLOAT', bucket_key, prefix .. 't', estimate)
    end
  end
end
return 1
