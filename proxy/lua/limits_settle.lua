-- Settle one request once its usage is known, and record that usage, in one round trip.
-- Idempotent: a request id already settled is ignored, so a replayed record never counts twice.
--
-- KEYS[1]  key record hash     tollgate:key:{id}         tpm, credits, reserved, name,
--                                                        budget_micros, budget_spent,
--                                                        budget_reserved, budget_start
-- KEYS[2]  bucket hash         tollgate:bucket:{id}      t (tokens level)
-- KEYS[3]  in-flight zset      tollgate:inflight:{id}    request id -> lease expiry (ms)
-- KEYS[4]  reservations hash   tollgate:reserved:{id}    request id -> "micros:tokens:<marker>",
--                                                        "<request id>|x" -> "<budget micros>:
--                                                        <period start ms>:<model pattern>"
-- KEYS[5]  usage stream        tollgate:usage:{id}       raw usage records, field "r" = JSON
-- KEYS[6]  aggregates hash     tollgate:agg:{id}         "<day>|<model>|<counter>" -> integer
-- KEYS[7]  settled zset        tollgate:settled:{id}     request id -> settle time (ms)
-- KEYS[8]  late-records zset   tollgate:late:{id}        usage entry id -> request time (ms)
-- ARGV[1]  request id
-- ARGV[2]  tokens actually used (prompt + completion)
-- ARGV[3]  cost actually incurred, micro-dollars
-- ARGV[4]  day of the request, YYYY-MM-DD (UTC)
-- ARGV[5]  model (as metered)
-- ARGV[6]  prompt tokens
-- ARGV[7]  completion tokens
-- ARGV[8]  raw-record retention in ms (older stream entries are trimmed)
-- ARGV[9]  the usage record, JSON
-- ARGV[10] time of the request, ms since the epoch
-- ARGV[11] lateness in ms: a record written longer than this after its request (replayed
--          from a spool, or swept) is also indexed by the request's time, so a usage query
--          for the request's window finds it
--
-- The stream and the settled set use the Redis clock: records are ordered and retained by
-- the time they were recorded; late records are found by their request's time through KEYS[8].
-- The real cost counts against the budget period the request was admitted in (if that is
-- still the current one), as its reservation there is released.
-- Returns {1, name, budget_micros or -1, budget_spent_micros} when settled now, {0} when this
-- request id was settled before.

local record_key, bucket_key, inflight_key, reserved_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local usage_key, agg_key, settled_key, late_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local request_id = ARGV[1]
local used_tokens, cost_micros = tonumber(ARGV[2]), tonumber(ARGV[3])
local day, model = ARGV[4], ARGV[5]
local prompt_tokens, completion_tokens = tonumber(ARGV[6]), tonumber(ARGV[7])
local retention_ms = tonumber(ARGV[8])
local request_ms, late_ms = tonumber(ARGV[10]), tonumber(ARGV[11])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Remember settled ids for as long as records are retained, the window a replay can come in;
-- an id already there was settled before.
if redis.call('ZADD', settled_key, 'NX', now, request_id) == 0 then
  return {0}
end
redis.call('ZREMRANGEBYSCORE', settled_key, '-inf', now - retention_ms)

redis.call('ZREM', inflight_key, request_id)
local rec = redis.call('HMGET', record_key, 'credits', 'tpm', 'name', 'budget_micros',
  'budget_start')
local reservation = redis.call('HGET', reserved_key, request_id)
local estimate
if reservation then
  redis.call('HDEL', reserved_key, request_id)
  local micros, tokens = string.match(reservation, '^(%-?%d+):(%-?%d+):')
  micros, estimate = tonumber(micros), tonumber(tokens)
  if micros ~= 0 then
    redis.call('HINCRBY', record_key, 'reserved', -micros)
  end
  -- Tokens: refund (or further debit) the difference between estimate and real use.
  -- The level may go negative, which delays later requests instead of losing tokens.
  if estimate ~= used_tokens and rec[2] then
    redis.call('HINCRBYFLOAT', bucket_key, 't', estimate - used_tokens)
  end
end

if rec[1] and cost_micros ~= 0 then
  redis.call('HINCRBY', record_key, 'credits', -cost_micros)
end

local extra_field = request_id .. '|x'
local extra = redis.call('HGET', reserved_key, extra_field)
if extra then
  redis.call('HDEL', reserved_key, extra_field)
  local held, start, glob = string.match(extra, '^(%-?%d+):(%d*):(.*)$')
  if start and start ~= '' and start == rec[5] then
    redis.call('HINCRBY', record_key, 'budget_reserved', -tonumber(held))
    redis.call('HINCRBY', record_key, 'budget_spent', cost_micros)
  end
  -- The model's tokens bucket is settled like the key's.
  local field = 'm|' .. (glob or '') .. '|t'
  if glob and glob ~= '' and estimate and estimate ~= used_tokens
      and redis.call('HEXISTS', bucket_key, field) == 1 then
    redis.call('HINCRBYFLOAT', bucket_key, field, estimate - used_tokens)
  end
end

local entry_id = redis.call('XADD', usage_key, 'MINID', '~', now - retention_ms, '*', 'r', ARGV[9])
if tonumber(string.match(entry_id, '^(%d+)')) - request_ms > late_ms then
  redis.call('ZADD', late_key, request_ms, entry_id)
  redis.call('ZREMRANGEBYSCORE', late_key, '-inf', now - retention_ms)
end
local prefix = day .. '|' .. model .. '|'
redis.call('HINCRBY', agg_key, prefix .. 'requests', 1)
redis.call('HINCRBY', agg_key, prefix .. 'prompt_tokens', prompt_tokens)
redis.call('HINCRBY', agg_key, prefix .. 'completion_tokens', completion_tokens)
redis.call('HINCRBY', agg_key, prefix .. 'cost_micros', cost_micros)
if not rec[4] then
  return {1, rec[3] or '', -1, 0}
end
return {1, rec[3] or '', tonumber(rec[4]),
  tonumber(redis.call('HGET', record_key, 'budget_spent') or '0')}
