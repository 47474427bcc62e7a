package limit

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// Settlement is one counter's part of a finished request: its
// reservation released and Actual charged in its place, or, when Res is
// the zero Reservation, Actual charged to Key without one (as
// [Counter.Add]).
type Settlement struct {
	Res    Reservation
	Key    string // the counter charged when Res is zero
	Actual float64
	// ID, if set on a charge without reservation, makes [Redis] apply it
	// once per ID and Key, as a reservation's settle, for the
	// reservation TTL plus a minute: a retried seed does not count twice.
	// [Local] applies every call.
	ID string
}

// Settler settles a request on several counters at once. [Local] settles
// each in turn; [Redis] runs one Lua script (one round trip).
type Settler interface {
	// SettleAll applies every settlement of ss at now: a reservation as
	// [Counter.Settle] (only its first settle counts), a charge without
	// one as [Counter.Add]. It returns an error for a negative or NaN
	// charge without a reservation (the others are still applied), or
	// when the counters could not be written.
	SettleAll(ctx context.Context, ss []Settlement, now time.Time) error
}

// SettleAll implements [Settler].
func (l *Local) SettleAll(ctx context.Context, ss []Settlement, now time.Time) error {
	var errs []error // appended only on failure: no allocation otherwise
	for _, s := range ss {
		var err error
		if s.Res.done == nil {
			err = l.Add(ctx, s.Key, s.Actual, now)
		} else {
			err = l.Settle(ctx, s.Res, s.Actual, now)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// settleScript releases reservations and charges actuals, once per
// request record and charge: a charge already settled (a retried settle,
// a settle after the reservation was released as an orphan) changes
// nothing. A settlement without a record id (a charge without
// reservation) always charges. The records of a run's settlements are
// read at once (HMGET) and each written once (its mask, see resvLua; a
// record that holds nothing more is kept as settled marks until keep ms
// from now); what a run's settlements charge or release on one key is
// summed and written once (one INCRBYFLOAT per key, and its PEXPIRE when
// the key is new; one HINCRBYFLOAT per second of a minute hash, whose
// seconds older than a minute before the run's latest are dropped when a
// second is new in it; one release per reserved key), so a batch of settlements on a few counters costs Redis
// a few calls per counter, not per settlement. The records it settles
// completely are listed once, due when their marks may be forgotten (the
// due lists are taken by the admission scripts, on the requests' clock).
// KEYS: the due set, the records, then 6 per counter (counterKeys).
// ARGV: now ms, keep ms, number of counters, the name of the run's list
// (unique), per counter the TTL in ms of its hour, day and month keys,
// then per settlement: counter (1-based), record id ("" for none),
// charge (0-based), actual, its time in s, the amount the charge holds
// (its reservation's estimate, released if still held).
// Returns how many settlements charged or released something.
var settleScript = redis.NewScript(resvLua + `
local argv, keys = ARGV, KEYS
local nowms, keep, nctr = tonumber(argv[1]), tonumber(argv[2]), tonumber(argv[3])
local rv, rh = keys[1], keys[2]
local a0 = 5 + 3 * nctr
local ids, recs = {}, {}
for b = a0, #argv, 6 do
  local id = argv[b + 1]
  if id ~= '' and recs[id] == nil then
    ids[#ids + 1] = id
    recs[id] = true
  end
end
for i = 1, #ids, 500 do
  local j = math.min(i + 499, #ids)
  local vals = redis.call('HMGET', rh, unpack(ids, i, j))
  for k = i, j do
    local v = vals[k - i + 1] or ''
    local nl = string.find(v, '\n', 1, true) or #v + 1
    recs[ids[k]] = {m = {string.byte(v, 1, nl - 1)}, n = nl - 1, body = string.sub(v, nl + 1)}
  end
end
-- num(s) is tonumber(s), parsed once per run per string: the indexes,
-- amounts and seconds of a batch repeat.
local nums = {}
local function num(s)
  local v = nums[s]
  if v == nil then
    v = tonumber(s)
    nums[s] = v
  end
  return v
end
local n = 0
local sums, ns, addc, secs = {}, {}, {}, {}
for b = a0, #argv, 6 do
  local c, id, actual = num(argv[b]), argv[b + 1], num(argv[b + 3])
  local counts = true
  if id ~= '' then
    local p = num(argv[b + 2]) + 1
    local r = recs[id]
    local st = r.m[p]
    if st == 115 then
      counts = false
    else
      if st == 104 then
        local ru = keys[2 + 6 * c]
        sums[ru] = (sums[ru] or 0) + num(argv[b + 5])
        ns[ru] = (ns[ru] or 0) + 1
      end
      for q = r.n + 1, p - 1 do r.m[q] = 45 end
      r.m[p] = 115
      if p > r.n then r.n = p end
      r.changed = true
    end
  end
  if counts then
    n = n + 1
    if actual > 0 then
      addc[c] = (addc[c] or 0) + actual
      local hs, sec = secs[c], argv[b + 4]
      if hs == nil then
        hs = {}
        secs[c] = hs
      end
      hs[sec] = (hs[sec] or 0) + actual
    end
  end
end
local hset, done = {}, {}
for id, r in pairs(recs) do
  if r.changed then
    local held = false
    for q = 1, r.n do
      if r.m[q] == 104 then
        held = true
        break
      end
    end
    local v = string.char(unpack(r.m, 1, r.n)) .. '\n'
    if held then
      v = v .. r.body
    else
      v = v .. (nowms + keep)
      done[#done + 1] = id
    end
    hset[#hset + 1] = id
    hset[#hset + 1] = v
  end
end
setAll(rh, 'HSET', hset)
if #done > 0 then
  redis.call('HSET', rh, argv[4], table.concat(done, ','))
  redis.call('ZADD', rv, nowms + keep, argv[4])
end
for ru, sum in pairs(sums) do release(ru, sum, ns[ru]) end
-- What the run charges, per key (counters of one key in different hours
-- share its total, and its day and month within them).
local adds, ttls, hashes = {}, {}, {}
for c, v in pairs(addc) do
  local kb, tb = 2 + 6 * (c - 1), 4 + 3 * (c - 1)
  for i = 1, 4 do
    local k = keys[kb + i]
    adds[k] = (adds[k] or 0) + v
    if i < 4 then ttls[k] = argv[tb + i] end
  end
  local h = keys[kb + 5]
  local hs = hashes[h]
  if hs == nil then
    hs = {}
    hashes[h] = hs
  end
  for sec, x in pairs(secs[c]) do hs[sec] = (hs[sec] or 0) + x end
end
-- A key's TTL is set when the key is new (its sum is what was just
-- added); a minute hash's, and its seconds older than a minute before
-- the run's latest dropped, when a second is new in it (once a second
-- at most).
for k, v in pairs(adds) do
  local sum = redis.call('INCRBYFLOAT', k, v)
  if ttls[k] and tonumber(sum) == v then redis.call('PEXPIRE', k, ttls[k]) end
end
for h, hs in pairs(hashes) do
  local new, top = false, 0
  for sec, v in pairs(hs) do
    if tonumber(redis.call('HINCRBYFLOAT', h, sec, v)) == v then new = true end
    if num(sec) > top then top = num(sec) end
  end
  if new then
    for _, f in ipairs(redis.call('HKEYS', h)) do
      if tonumber(f) < top - 60 then redis.call('HDEL', h, f) end
    end
    redis.call('PEXPIRE', h, 62000)
  end
end
return n
`)

// SettleAll implements [Settler] with one script run for every
// settlement of ss (shared with the settlements of concurrent calls). All
// keys must be served by one Redis node. When Redis cannot be reached, the
// settlements of reservations are queued and replayed once it answers
// again (see [Redis.Settle]); charges without a reservation are lost.
func (r *Redis) SettleAll(ctx context.Context, ss []Settlement, now time.Time) error {
	var buf [16]orphan
	list := buf[:0]
	var errs []error
	for _, s := range ss {
		if s.Res.done == nil {
			if s.Actual < 0 || s.Actual != s.Actual {
				errs = append(errs, fmt.Errorf("%w: amount %v", ErrInvalidLimit, s.Actual))
			} else if s.Actual > 0 {
				o := orphan{key: s.Key, actual: s.Actual, at: now}
				if s.ID != "" {
					o.member = s.ID + "@" + s.Key // never a request's id (digits)
				}
				list = append(list, o)
			}
			continue
		}
		if o, ok := r.settling(s.Res, s.Actual, now); ok {
			list = append(list, o)
		}
	}
	if len(list) > 0 {
		errs = append(errs, r.charge(ctx, "settle", list))
	}
	return errors.Join(errs...)
}

// settling is what settling res with actual writes to Redis; ok is false
// when there is nothing to write (a settled reservation, nothing reserved
// on Redis and nothing charged).
func (r *Redis) settling(res Reservation, actual float64, now time.Time) (o orphan, ok bool) {
	if !res.settleOnce() {
		return orphan{}, false
	}
	if actual < 0 || actual != actual {
		actual = 0
	}
	member := ""
	if res.recorded || res.local {
		member = res.member
	}
	if res.local {
		r.share.settle(res, actual)
	}
	if member == "" && actual == 0 || res.local && actual == 0 {
		return orphan{}, false
	}
	return orphan{key: res.key, member: member, part: res.part, held: res.amount, actual: actual, at: now}, true
}

// calendarGrace keeps a calendar window's key an hour past its end, for
// replicas whose clocks lag.
const calendarGrace = time.Hour

// charge runs settleScript for list in the next settle batch (one script
// run for the settlements that arrive while the previous batch is in
// flight, see [batcher]). When it fails, the settlements of reservations
// are queued and replayed once Redis answers again (the first try may
// have landed: the script is idempotent by member, so it never charges
// twice). A caller whose ctx ends gets ctx's error; its settlements are
// still sent.
func (r *Redis) charge(ctx context.Context, op string, list []orphan) error {
	c := &settleCall{callState: newCallState(), op: op, list: list}
	r.settles.submit(c)
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// settleCall is one call's settlements in a settle batch.
type settleCall struct {
	callState
	op   string
	list []orphan
	err  error // set by the batch before done is closed
}

// maxSettleBatch is how many settlements fill a settle batch: a script
// run that long (about 2 µs of Redis time each, a request on 9 counters
// about 20 µs; what a run writes per counter is shared by more requests
// the longer it is) delays the admissions queued behind it on Redis by
// about a millisecond.
const maxSettleBatch = 512

// settleFull reports whether a settle batch is full.
func settleFull(batch []*settleCall) bool {
	n := 0
	for _, c := range batch {
		n += len(c.list)
	}
	return n >= maxSettleBatch
}

// settleBatch runs settleScript once for every settlement of batch and
// delivers the outcome to each call.
func (r *Redis) settleBatch(batch []*settleCall) {
	list := batch[0].list
	if len(batch) > 1 {
		list = nil
		for _, c := range batch {
			list = append(list, c.list...)
		}
	}
	err := r.settleMany(r.ctx, batch[0].op, list)
	if err != nil && !errors.Is(err, ErrUnavailable) {
		// The backend is closed (r.ctx done).
		err = fmt.Errorf("%w: %s: %w", ErrUnavailable, batch[0].op, err)
	}
	if err != nil {
		for _, o := range list {
			if o.member != "" {
				r.orph.add(o)
			}
		}
	}
	for _, c := range batch {
		c.err = err
		c.deliver()
	}
}

// settleMany runs settleScript once for list, each settlement at its own
// time; the keys of a counter (a key in one hour) are sent once.
func (r *Redis) settleMany(ctx context.Context, op string, list []orphan) error {
	ctrs := make(map[ctrKey]int, 16)
	keys := make([]string, 2, 2+6*16)
	keys[0], keys[1] = r.dueKey(), r.recordsKey()
	ctrArgs := make([]any, 0, 3*16)
	setArgs := make([]any, 0, 6*len(list))
	for _, o := range list {
		ck := ctrKey{o.key, calStart(Hour, o.at)}
		c, ok := ctrs[ck]
		if !ok {
			c = len(ctrs) + 1
			ctrs[ck] = c
			keys = r.appendCounterKeys(keys, o.key, o.at)
			for w := Hour; w <= Month; w++ {
				ctrArgs = append(ctrArgs, (calRetry(w, o.at) + calendarGrace).Milliseconds())
			}
		}
		setArgs = append(setArgs, c, o.member, o.part, o.actual, o.at.Unix(), o.held)
	}
	args := make([]any, 0, 4+len(ctrArgs)+len(setArgs))
	args = append(args, time.Now().UnixMilli(), (r.cfg.ReservationTTL + time.Minute).Milliseconds(), len(ctrs),
		"#m"+strconv.FormatUint(r.newID(), 10))
	args = append(append(args, ctrArgs...), setArgs...)
	return r.run(ctx, op, func(cctx context.Context) error {
		return settleScript.Run(cctx, r.c, keys, args...).Err()
	})
}

var (
	_ Settler = (*Local)(nil)
	_ Settler = (*Redis)(nil)
)
