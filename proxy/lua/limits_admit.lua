-- Authenticate one API key and admit one request, all or nothing, in one round trip.
--
-- KEYS[1]  key record hash     tollgate:key:{id}        hash, name, rpm, tpm, max_concurrency,
--                                                       models, revoked, credits, reserved,
--                                                       expires_ms, prev_hash, prev_until_ms,
--                                                       budget_micros, budget_period,
--                                                       budget_spent, budget_reserved,
--                                                       budget_start (ms, the period spent is of),
--                                                       model_limits ("<glob>\t<rpm>\t<tpm>\n"...)
-- KEYS[2]  bucket hash         tollgate:bucket:{id}     r, rt (requests level, ms), t, tt (tokens);
--                                                       m|<glob>|r, …|rt, …|t, …|tt per model limit
-- KEYS[3]  in-flight zset      tollgate:inflight:{id}   request id -> lease expiry (ms)
-- KEYS[4]  reservations hash   tollgate:reserved:{id}   request id -> "micros:tokens:<marker>",
--                                                       "<request id>|x" -> "<budget micros>:
--                                                       <period start ms>:<model pattern>"
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
--          tokens_reset_ms, retry_after_ms, budget_micros, budget_spent_micros,
--          budget_resets_ms}; limits absent from the key are returned as -1.
-- verdict: ok | unknown_key | revoked | expired | model_not_allowed | unpriced | requests |
--          tokens | model_requests | model_tokens | concurrency | credits | budget.
-- Only "ok" writes anything. The first model limit whose glob matches the model has its own
-- buckets beside the key's; the reply's requests and tokens values are the tighter bucket's.
-- A budget is a spend cap per UTC day, week (from Monday) or month: the worst case is reserved
-- against what the period has left, so racing requests never together exceed it.
-- The presented key is the current secret, or the previous one until prev_until_ms (a rotation
-- with grace). Allowed models are glob patterns (`*` any run, `?` one character).

local record_key, bucket_key, inflight_key, reserved_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key_hash, request_id, model = ARGV[1], ARGV[2], ARGV[4]
local token_estimate = tonumber(ARGV[5])
local cost_micros = tonumber(ARGV[6])
local lease_ms = tonumber(ARGV[7])

local rec = redis.call('HMGET', record_key,
  'hash', 'name', 'rpm', 'tpm', 'max_concurrency', 'models', 'revoked', 'credits', 'reserved',
  'expires_ms', 'prev_hash', 'prev_until_ms',
  'budget_micros', 'budget_period', 'budget_spent', 'budget_reserved', 'budget_start',
  'model_limits')
if not rec[1] then
  return {'unknown_key'}
end

local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

if rec[1] ~= key_hash
    and not (rec[11] == key_hash and now < (tonumber(rec[12]) or 0)) then
  return {'unknown_key'}
end
local name = rec[2] or ''
if rec[7] == '1' then
  return {'revoked', name}
end
if rec[10] and now >= tonumber(rec[10]) then
  return {'expired', name}
end

-- A glob segment (no `*`) as a Lua pattern: magic characters escaped, `?` any one character.
local function segment_pattern(segment)
  return (string.gsub(string.gsub(segment, '[%^%$%(%)%%%.%[%]%+%-]', '%%%0'), '%?', '.'))
end

-- Glob match without backtracking: the parts between stars are fixed-length, so taking each
-- at its leftmost place is exact; each find is linear in the model name.
local function glob_matches(glob, text)
  if not string.find(glob, '[%*%?]') then
    return glob == text
  end
  local parts, from = {}, 1
  while true do
    local star = string.find(glob, '*', from, true)
    if not star then
      parts[#parts + 1] = string.sub(glob, from)
      break
    end
    parts[#parts + 1] = string.sub(glob, from, star - 1)
    from = star + 1
  end
  if #parts == 1 then
    return string.find(text, '^' .. segment_pattern(parts[1]) .. '$') ~= nil
  end
  local first, last = parts[1], parts[#parts]
  if #first + #last > #text then
    return false
  end
  if not string.find(string.sub(text, 1, #first), '^' .. segment_pattern(first) .. '$') then
    return false
  end
  local stop = #text - #last
  if not string.find(string.sub(text, stop + 1), '^' .. segment_pattern(last) .. '$') then
    return false
  end
  local middle, pos = string.sub(text, 1, stop), #first + 1
  for i = 2, #parts - 1 do
    if parts[i] ~= '' then
      local _, finish = string.find(middle, segment_pattern(parts[i]), pos)
      if not finish then
        return false
      end
      pos = finish + 1
    end
  end
  return true
end

local models = rec[6]
if models and models ~= '' and not string.find(models, '\n' .. model .. '\n', 1, true) then
  local allowed = false
  for glob in string.gmatch(models, '[^\n]+') do
    if string.find(glob, '[%*%?]') and glob_matches(glob, model) then
      allowed = true
      break
    end
  end
  if not allowed then
    return {'model_not_allowed', name}
  end
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
local model_glob, model_rpm, model_tpm
if rec[18] and rec[18] ~= '' then
  for line in string.gmatch(rec[18], '[^\n]+') do
    local glob, limit_r, limit_t = string.match(line, '^(.*)\t(%d*)\t(%d*)$')
    if glob and glob_matches(glob, model) then
      model_glob, model_rpm, model_tpm = glob, tonumber(limit_r), tonumber(limit_t)
      break
    end
  end
end
local model_requests_level, model_tokens_level = 0, 0
local mprefix = model_glob and ('m|' .. model_glob .. '|') or ''
if model_glob then
  local mb = redis.call('HMGET', bucket_key, mprefix .. 'r', mprefix .. 'rt', mprefix .. 't',
    mprefix .. 'tt')
  if model_rpm then
    model_requests_level = level(model_rpm, mb[1], mb[2])
    if verdict == 'ok' and model_requests_level < 1 then
      verdict = 'model_requests'
      retry_ms = math.ceil((1 - model_requests_level) * 60000 / model_rpm)
    end
  end
  if model_tpm then
    model_tokens_level = level(model_tpm, mb[3], mb[4])
    local needed = math.min(token_estimate, model_tpm)
    if verdict == 'ok' and model_tokens_level < needed then
      verdict = 'model_tokens'
      retry_ms = math.ceil((needed - model_tokens_level) * 60000 / model_tpm)
    end
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

-- The UTC calendar period holding `now`, as [start, end) in ms (civil dates after H. Hinnant).
local DAY_MS = 86400000
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function period_bounds(period)
  local day = math.floor(now / DAY_MS)
  if period == 'week' then
    local monday = day - (day + 3) % 7  -- day 0, 1970-01-01, was a Thursday
    return monday * DAY_MS, (monday + 7) * DAY_MS
  elseif period == 'month' then
    local y, m = civil_from_days(day)
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    return days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS
  end
  return day * DAY_MS, (day + 1) * DAY_MS
end

local budget = tonumber(rec[13])
local budget_spent, budget_held, budget_end, budget_start = 0, 0, -1, ''
local budget_rolled = false
if budget then
  local start, finish = period_bounds(rec[14])
  budget_start, budget_end = string.format('%d', start), finish
  if rec[17] == budget_start then
    budget_spent, budget_held = tonumber(rec[15]) or 0, tonumber(rec[16]) or 0
  else
    budget_rolled = true  -- a new period: what the last one spent or holds no longer counts
  end
  if verdict == 'ok' then
    local left = budget - budget_spent - budget_held
    if cost_micros < 0 then
      verdict = 'unpriced'
    elseif left <= 0 or left < cost_micros then
      verdict = 'budget'
      retry_ms = budget_end - now
    end
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
  if model_rpm then
    model_requests_level = model_requests_level - 1
    for _, v in ipairs({mprefix .. 'r', string.format('%.17g', model_requests_level),
        mprefix .. 'rt', now}) do
      table.insert(levels, v)
    end
  end
  if model_tpm then
    model_tokens_level = model_tokens_level - token_estimate
    for _, v in ipairs({mprefix .. 't', string.format('%.17g', model_tokens_level),
        mprefix .. 'tt', now}) do
      table.insert(levels, v)
    end
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
  if budget then
    if budget_rolled then
      redis.call('HSET', record_key, 'budget_start', budget_start, 'budget_spent', 0,
        'budget_reserved', 0)
    end
    redis.call('HINCRBY', record_key, 'budget_reserved', cost_micros)
  end
  if budget or model_glob then
    redis.call('HSET', reserved_key, request_id .. '|x', string.format('%d:%s:%s',
      budget and cost_micros or 0, budget and budget_start or '', model_glob or ''))
  end
end

local function remaining(capacity, current)
  if not capacity then return {-1, -1, -1} end
  local reset_ms = math.ceil(math.max(0, capacity - current) * 60000 / capacity)
  return {capacity, math.max(0, math.floor(current)), reset_ms}
end
local r = remaining(rpm, requests_level)
local t = remaining(tpm, tokens_level)
-- Per dimension, the tighter of the key's bucket and the model's.
if model_rpm then
  local mr = remaining(model_rpm, model_requests_level)
  if not rpm or mr[2] < r[2] or verdict == 'model_requests' then r = mr end
end
if model_tpm then
  local mt = remaining(model_tpm, model_tokens_level)
  if not tpm or mt[2] < t[2] or verdict == 'model_tokens' then t = mt end
end
return {verdict, name, r[1], r[2], r[3], t[1], t[2], t[3], retry_ms,
  budget or -1, budget_spent, budget_end}
