package limit

import "github.com/redis/go-redis/v9"

// The Lua scripts of [Redis]: each call is one of them, run atomically
// in one round trip (EVALSHA).

// rateScript is the sliding-window log behind Allow.
// KEYS[1] sorted set of admissions (score: Unix µs).
// ARGV: now µs, window µs, limit, member. Returns {allowed, count, retry µs}.
var rateScript = redis.NewScript(`
local key = KEYS[1]
local now = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
local n = redis.call('ZCARD', key)
if n < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(win / 1000) + 1000)
  return {1, n + 1, 0}
end
local old = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
return {0, n, tonumber(old[2]) + win - now}
`)

// reserveScript checks limits and records a reservation.
// KEYS: hour, day, month, total, minute hash, reserved (see resvLua),
// then the due set and the records. ARGV: now ms, now s, amount,
// reservation id, ttl ms, n, then n × (window, warn, block, calendar
// retry ms). Returns check's reply (see admitLua).
var reserveScript = redis.NewScript(resvLua + `
local now = tonumber(ARGV[1])
local sec = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
dropDue(KEYS[7], KEYS[8], now, ttl + 60000)
` + admitLua + `
local d = check(1, 6, amount, tonumber(reservedOf(KEYS[6])))
if d[1] == 0 then return d end
if amount > 0 then
  redis.call('ZADD', KEYS[7], now + ttl, ARGV[4])
  redis.call('HSET', KEYS[8], ARGV[4], 'h\n' .. ARGV[3] .. '\0' .. KEYS[6] .. '\0')
  hold(KEYS[6], amount, 1, ttl)
end
return d
`)

// resvLua defines the Lua functions the scripts that hold or release
// reservations share. A request's reservations are one record (by the
// request's id): a field of the records hash whose value is a mask, one
// character per charge of the request ('h' held, 's' settled, '-'
// neither: a charge that holds nothing, or one the record does not
// know), a newline, then per charge its amount and its counter's
// reserved key, each ended by a NUL (both empty for a charge that holds
// nothing, and dropped once nothing is held); and one member of the due
// set, scored by when the record is due (ms): its reservations' expiry
// while it holds something, else when its settled marks may be
// forgotten. A counter's reserved key is a hash of what its held
// reservations sum to (a) and how many they are (n); it is deleted when n
// reaches 0, so a counter with nothing held reads exactly 0.
//
// dropDue(rv, rh, now, keep) releases what the records due by now (due
// set rv, records rh) still hold and deletes them, at most dueBatch per
// run (the rest on the next run: a reservation dropped late only makes
// admission stricter meanwhile); a record that holds some charges and has
// settled others keeps its settled marks for keep ms more. release(ru, sum, n) takes n held reservations
// summing to sum off a counter's reserved key ru; hold(ru, sum, n, ttl)
// adds them. reservedOf(ru) is what a counter's reservations sum to, as a
// string ("0" for none, never negative).
const resvLua = `
local function release(ru, sum, n)
  if redis.call('HINCRBY', ru, 'n', -n) <= 0 then
    redis.call('DEL', ru)
  else
    redis.call('HINCRBYFLOAT', ru, 'a', -sum)
  end
end

local function hold(ru, sum, n, ttl)
  redis.call('HINCRBYFLOAT', ru, 'a', sum)
  redis.call('HINCRBY', ru, 'n', n)
  redis.call('PEXPIRE', ru, ttl + 60000)
end

local function reservedOf(ru)
  local a = redis.call('HGET', ru, 'a')
  if not a or tonumber(a) < 0 then return '0' end
  return a
end

local function dropDue(rv, rh, now, keep)
  local due = redis.call('ZRANGEBYSCORE', rv, '-inf', now, 'LIMIT', 0, ` + dueBatch + `)
  if #due == 0 then return end
  local vals = redis.call('HMGET', rh, unpack(due))
  local sums, ns, marks, del = {}, {}, {}, {}
  for i, v in ipairs(vals) do
    local nl = v and string.find(v, '\n', 1, true)
    local mask = nl and string.sub(v, 1, nl - 1)
    if mask and string.find(mask, 'h', 1, true) then
      local p = 0
      for a, ru in string.gmatch(string.sub(v, nl + 1), '([^%z]*)%z([^%z]*)%z') do
        p = p + 1
        if string.byte(mask, p) == 104 then
          sums[ru] = (sums[ru] or 0) + tonumber(a)
          ns[ru] = (ns[ru] or 0) + 1
        end
      end
    end
    if mask and string.find(mask, 's', 1, true) and string.find(mask, 'h', 1, true) then
      marks[#marks + 1] = due[i]
      marks[#marks + 1] = string.gsub(mask, 'h', '-') .. '\n'
    else
      del[#del + 1] = due[i]
    end
  end
  redis.call('ZREMRANGEBYRANK', rv, 0, #due - 1)
  if #del > 0 then redis.call('HDEL', rh, unpack(del)) end
  for i = 1, #marks, 2 do
    redis.call('HSET', rh, marks[i], marks[i + 1])
    redis.call('ZADD', rv, now + keep, marks[i])
  end
  for ru, sum in pairs(sums) do release(ru, sum, ns[ru]) end
end
`

// dueBatch is the most due records one script run drops (as a Lua
// literal).
const dueBatch = "256"

// admitLua defines check(kb, ab, amount, reserved) for reserveScript:
// it applies the admission rule (settled + reserved below each block) to
// the counter whose keys start at KEYS[kb] and whose windows are
// described from ARGV[ab] on, and returns {allowed, warn, limit index, used, retry ms,
// reserved, room}, room being what is left under the tightest block
// after this request ("inf" without one, "0" when refused). A counter's
// settled usage is read from Redis once per script run (reads), so a
// batch of requests on one counter reads it once. The including script
// defines now and sec first (a batch sets them per request).
const admitLua = `
local reads = {}
local function settled(kb, w)
  local g = reads[kb]
  if g == nil then
    g = {}
    reads[kb] = g
  end
  if g[w] == nil then
    if w ~= 1 then
      g[w] = tonumber(redis.call('GET', KEYS[kb + w - 2]) or '0')
    else
      g[w] = redis.call('HGETALL', KEYS[kb + 4])
    end
  end
  return g[w]
end

local function check(kb, ab, amount, reserved)
  local n = tonumber(ARGV[ab])
  local secs = nil
  local minute = 0
  local function usage(w)
    if w ~= 1 then return settled(kb, w) end
    if secs == nil then
      secs = {}
      local h = settled(kb, 1)
      for i = 1, #h, 2 do
        local s = tonumber(h[i])
        if s >= sec - 60 and s <= sec then
          local v = tonumber(h[i + 1])
          table.insert(secs, {s, v})
          minute = minute + v
        end
      end
      table.sort(secs, function(a, b) return a[1] < b[1] end)
    end
    return minute
  end
  local allowed, warn, warnIdx, warnUsed = 1, 0, 0, 0
  local tight, tightUsed, tightRoom = 0, 0, 0
  local pick, pickW, pickUsed, pickRetry = 0, 0, 0, 0
  for i = 1, n do
    local b = ab + (i - 1) * 4
    local w = tonumber(ARGV[b + 1])
    local wl = tonumber(ARGV[b + 2])
    local bl = tonumber(ARGV[b + 3])
    if wl > 0 or bl > 0 then
      local u = usage(w)
      local tot = u + reserved
      if wl > 0 and tot + amount >= wl and warn == 0 then
        warn, warnIdx, warnUsed = 1, i, tot + amount
      end
      if bl > 0 and tot >= bl then
        local ra = tonumber(ARGV[b + 4])
        if w == 1 then
          ra = 60000
          local left = u
          for _, e in ipairs(secs) do
            left = left - e[2]
            if e[2] ~= 0 and left + reserved < bl then
              ra = (e[1] + 61) * 1000 - now
              break
            end
          end
        end
        if allowed == 1 or (pickW ~= 5 and (w == 5 or ra > pickRetry)) then
          pick, pickW, pickUsed, pickRetry = i, w, tot, ra
        end
        allowed = 0
      elseif bl > 0 and (tight == 0 or bl - (tot + amount) < tightRoom) then
        tight, tightUsed, tightRoom = i, tot + amount, bl - (tot + amount)
      end
    end
  end
  if allowed == 0 then
    if pickW == 5 then pickRetry = 0 end
    return {0, warn, pick, tostring(pickUsed), pickRetry, tostring(reserved), '0'}
  end
  local room = 'inf'
  if tight ~= 0 then room = tostring(tightRoom) end
  if warn == 1 then return {1, 1, warnIdx, tostring(warnUsed), 0, tostring(reserved + amount), room} end
  return {1, 0, tight, tostring(tightUsed), 0, tostring(reserved + amount), room}
end
`
