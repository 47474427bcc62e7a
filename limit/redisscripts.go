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

// reserveScript checks limits and records a reservation (its own
// record, listed alone; see resvLua).
// KEYS: hour, day, month, total, minute hash, reserved, then the due set
// and the records. ARGV: now ms, now s, amount, reservation id, ttl ms,
// n, then n × (window, warn, block, calendar retry ms). Returns check's
// reply (see admitLua).
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
  local id = ARGV[4]
  redis.call('HSET', KEYS[8], id, 'h\n' .. ARGV[3] .. '\0' .. KEYS[6] .. '\0', '#b' .. id, id)
  redis.call('ZADD', KEYS[7], now + ttl, '#b' .. id)
  hold(KEYS[6], amount, 1, ttl)
end
return d
`)

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
