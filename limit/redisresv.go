package limit

// resvLua defines the Lua functions of the scripts that hold or release
// reservations ([Redis]'s reservation records).
//
// A request's reservations on all its counters are one record, a field of
// the records hash named by the request's id, whose value is a mask, one
// character per charge of the request ('h' held, 's' settled, '-'
// neither: a charge that holds nothing, or one the record does not know),
// a newline, then either, while a charge is held, per charge its amount
// and its counter's reserved key, each ended by a NUL (both empty for a
// charge that holds nothing), or, once nothing is held, when the record's
// settled marks may be forgotten (ms). Records are found when due through
// lists: a list is a field of the records hash ('#' and a unique name)
// holding record ids separated by commas, and a member of the due set
// scored by when its records are due (ms). An admission batch lists its
// records once, due at their expiry; a settle run lists the records it
// settled completely, due when their marks may be forgotten. So a
// request costs one hash field, not a sorted-set entry, to admit and
// to settle.
//
// A counter's reserved key holds how many reservations it holds and
// what they sum to, as "<n> <sum>" (the sum as %.17g: read back exactly);
// it is deleted when n reaches 0, so a counter with nothing held reads
// exactly 0.
//
// dropDue(rv, rh, now, keep) takes the lists due by now off the due set
// rv (at most dueLists per run; the rest on the next run: a reservation
// released late only makes admission stricter meanwhile) and, for each
// listed record of rh, releases what it still holds; a record is then
// deleted, unless it has settled marks, which are kept keep ms more (in
// a new list), or it is a record of settled marks not due yet (listed
// again later). release(ru, sum, n) takes n held reservations summing to
// sum off a counter's reserved key ru; hold(ru, sum, n, ttl) adds them.
// parseResv(v) reads a reserved key's value (false: none) as its count
// and its sum (a string); reservedOf(ru) is what a counter's reservations
// sum to, as a string ("0" for none, never negative). setAll(key, cmd, list) runs cmd (HSET,
// HDEL) on key with list's elements as arguments, 1 000 at a time.
const resvLua = `
local function parseResv(v)
  if not v then return 0, '0' end
  local sp = string.find(v, ' ', 1, true)
  return tonumber(string.sub(v, 1, sp - 1)), string.sub(v, sp + 1)
end

local function release(ru, sum, n)
  local k, a = parseResv(redis.call('GET', ru))
  if k <= n then
    redis.call('DEL', ru)
  else
    redis.call('SET', ru, (k - n) .. ' ' .. string.format('%.17g', tonumber(a) - sum), 'KEEPTTL')
  end
end

local function hold(ru, sum, n, ttl)
  local k, a = parseResv(redis.call('GET', ru))
  redis.call('SET', ru, (k + n) .. ' ' .. string.format('%.17g', tonumber(a) + sum), 'PX', ttl + 60000)
end

local function reservedOf(ru)
  local _, a = parseResv(redis.call('GET', ru))
  if tonumber(a) < 0 then return '0' end
  return a
end

local function setAll(key, cmd, list)
  for i = 1, #list, 1000 do redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list))) end
end

local function dropDue(rv, rh, now, keep)
  local due = redis.call('ZRANGEBYSCORE', rv, '-inf', now, 'LIMIT', 0, ` + dueLists + `)
  if #due == 0 then return end
  redis.call('ZREMRANGEBYRANK', rv, 0, #due - 1)
  local lists = redis.call('HMGET', rh, unpack(due))
  redis.call('HDEL', rh, unpack(due))
  local ids = {}
  for _, l in ipairs(lists) do
    if l then
      for id in string.gmatch(l, '[^,]+') do ids[#ids + 1] = id end
    end
  end
  local sums, ns, del, marks, kept = {}, {}, {}, {}, {}
  for i = 1, #ids, 500 do
    local j = math.min(i + 499, #ids)
    local vals = redis.call('HMGET', rh, unpack(ids, i, j))
    for k = i, j do
      local v = vals[k - i + 1]
      local nl = v and string.find(v, '\n', 1, true)
      if nl then
        local mask = string.sub(v, 1, nl - 1)
        if string.find(mask, 'h', 1, true) then
          local p = 0
          for a, ru in string.gmatch(string.sub(v, nl + 1), '([^%z]*)%z([^%z]*)%z') do
            p = p + 1
            if string.byte(mask, p) == 104 then
              sums[ru] = (sums[ru] or 0) + tonumber(a)
              ns[ru] = (ns[ru] or 0) + 1
            end
          end
          if string.find(mask, 's', 1, true) then
            marks[#marks + 1] = ids[k]
            marks[#marks + 1] = string.gsub(mask, 'h', '-') .. '\n' .. (now + keep)
            kept[#kept + 1] = ids[k]
          else
            del[#del + 1] = ids[k]
          end
        else
          local at = tonumber(string.sub(v, nl + 1))
          if not at or at <= now then del[#del + 1] = ids[k] end
        end
      end
    end
  end
  setAll(rh, 'HDEL', del)
  setAll(rh, 'HSET', marks)
  if #kept > 0 then
    redis.call('HSET', rh, due[1] .. '+', table.concat(kept, ','))
    redis.call('ZADD', rv, now + keep, due[1] .. '+')
  end
  for ru, sum in pairs(sums) do release(ru, sum, ns[ru]) end
end
`

// dueLists is the most due lists one script run takes (as a Lua
// literal): an admission batch's list holds at most [maxAdmitBatch]
// records, a settle run's at most [maxSettleBatch].
const dueLists = "4"
