-- Authenticate one API key and admit one request, all or nothing, in one round trip.
--
-- KEYS[1]  key record hash     tollgate:key:{id}        hash, name, rpm, tpm, max_concurrency,
--                                                       models, revoked, credits, reserved
-- KEYS[2]  bucket hash         tollgate:bucket:{id}     r, rt (requests level, ms), t, tt (tokens)
-- KEYS[3]  in-flight zset      tollgate:inflight:{id}   request id -> lease expiry (ms)
-- KEYS[4]  reservations hash   tollgate:reserved:{id}   request id -> "micros:tokens:<marker>"
-- ARGV[1]  SHA-256 hex of the presented key
-- ARGV[2]  request id
-- ARGV[3]  now in ms, or "" to use the Redis clock
-- ARGV[4]  model
-- ARGV[5]  token estimate charged to the tokens bucket (prompt estimate + max completion)
-- ARGV[6]  worst-case cost in micro-dollars; -1 when the model has no price
-- ARGV[7]  lease in ms: how long the in-flight entry outlives a crashed proxy
-- ARGV[8]  marker: JSON the sweeper turns into an estimated record if the proxy dies
--
-- Returns {verdict, name, rpm, requests_remaining, requests_reset_ms, tpm, tokens_remaining,
--          tokens_reset_ms, retry_after_ms}; limits absent from the key are returned as -1.
-- verdict: ok | unknown_key | revoked | model_not_allowed | unpriced | requests | tokens |
--          concurrency | credits. Only "ok" writes anything.

local record_key, bucket_key, inflight_key, reserved_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key_hash, request_id, model = ARGV[1], ARGV[2], ARGV[4]
local token_estimate = tonumber(ARGV[5])
local cost_micros = tonumber(ARGV[6])
local lease_ms = tonumber(ARGV[7])

local rec = redis.call('HMGET', record_key,
  'hash', 'name', 'rpm', 'tpm', 'max_concurrency', 'models', 'revoked', 'credits', 'reserved')
if not rec[1] or rec[1] ~= key_hash then
  return {'unknown_key'}
end
local name = rec[2] or ''
if rec[7] == '1' then
  return {'revoked', name}
end
if rec[6] and rec[6] ~= '' and not string.find(rec[6], '\n' .. model .. '\n', 1, true) then
  return {'model_not_allowed', name}
end

local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local rpm, tpm, max_concurrency = tonumber(rec[3]), tonumber(rec[4]), tonumber(rec[5])
local credits, reserved = tonumber(rec[8]), tonumber(rec[9]) or 0
local verdict, retry_ms = 'ok', 0

-- Token buckets: level refilled continuously at capacity/60000 per ms, capped at capacity.
local bucket = redis.call('HMGET', bucket_key, 'r', 'rt', 't', 'tt')
local function level(capacity, stored, stamp)
  if not stored then return capacity end
  local elapsed = stamp and math.max(0, now - tonumber(stamp)) or 0
  return math.min(capacity, tonumber(stored) + elapsed * capacity / 60000)
end

local requests_level, tokens_level = 0, 0
if rpm then
  requests_level = level(rpm, bucket[1], bucket[2])
  if requests_level < 1 then
    verdict = 'requests'
    retry_ms = math.ceil((1 - requests_level) * 60000 / rpm)
  end
end
if tpm then
  tokens_level = level(tpm, bucket[3], bucket[4])
  -- A request larger than the whole bucket may pass when the bucket is full; its debt
  -- then delays later requests instead of blocking this one forever.
  local needed = math.min(token_estimate, tpm)
  if verdict == 'ok' and tokens_level < needed then
    verdict = 'tokens'
    retry_ms = math.ceil((needed - tokens_level) * 60000 / tpm)
  end
end
if verdict == 'ok' and max_concurrency then
  if redis.call('ZCOUNT', inflight_key, now, '+inf') >= max_concurrency then
    verdict = 'concurrency'
    retry_ms = 1000
  end
end
if verdict == 'ok' and credits then
  if cost_micros < 0 then
    verdict = 'unpriced'
  elseif credits - reserved <= 0 or credits - reserved < cost_micros then
    verdict = 'credits'
  end
end

if verdict == 'ok' then
  local levels = {}
  if rpm then
    requests_level = requests_level - 1
    levels = {'r', string.format('%.17g', requests_level), 'rt', now}
  end
  if tpm then
    tokens_level = tokens_level - token_estimate
    table.insert(levels, 't')
    table.insert(levels, string.format('%.17g', tokens_level))
    table.insert(levels, 'tt')
    table.insert(levels, now)
  end
  if #levels > 0 then
    redis.call('HSET', bucket_key, unpack(levels))
  end
  redis.call('ZADD', inflight_key, now + lease_ms, request_id)
  redis.call('HSET', reserved_key, request_id, string.format('%d:%d:%s',
    credits and cost_micros or 0, token_estimate, ARGV[8]))
  if credits then
    redis.call('HINCRBY', record_key, 'reserved', cost_micros)
  end
end

local function remaining(capacity, current)
  if not capacity then return {-1, -1, -1} end
  local reset_ms = math.ceil(math.max(0, capacity - current) * 60000 / capacity)
  return {capacity, math.max(0, math.floor(current)), reset_ms}
end
local r = remaining(rpm, requests_level)
local t = remaining(tpm, tokens_level)
return {verdict, name, r[1], r[2], r[3], t[1], t[2], t[3], retry_ms}
