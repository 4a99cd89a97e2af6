-- Add (or, with a negative amount, remove) credits, refusing any balance outside ±bound,
-- in one step, so racing top-ups can never together carry a balance past the bound.
--
-- KEYS[1]  key record hash     tollgate:key:{id}         id, credits
-- ARGV[1]  amount, micro-dollars (an integer; negative removes)
-- ARGV[2]  bound, micro-dollars: the balance must stay within [-bound, bound]
--
-- A key without a balance (unlimited) starts from 0. The bound is far below 2**53, so the
-- sum is exact in Lua's doubles; HINCRBY then stores it as Redis' own integer.
-- Returns 1 when added, 0 when the key does not exist, -1 when the balance would leave the
-- bound (nothing is written then).

local record_key = KEYS[1]
local amount, bound = tonumber(ARGV[1]), tonumber(ARGV[2])

local rec = redis.call('HMGET', record_key, 'id', 'credits')
if not rec[1] then
  return 0
end
local balance = tonumber(rec[2] or '0')
if math.abs(amount) > bound or math.abs(balance + amount) > bound then
  return -1
end
redis.call('HINCRBY', record_key, 'credits', ARGV[1])
return 1
