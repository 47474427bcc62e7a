package limit

import (
	"context"
	"errors"
	"fmt"
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
// member: a member already settled (a retried settle, a settle after the
// reservation was released as an orphan) changes nothing. A settlement
// without a member (a charge without reservation) always charges. Per
// settlement only the settled mark (ZADD NX) and the release (ZREM) are
// written; what a run's settlements charge or release on one key is
// summed and written once (one INCRBYFLOAT and PEXPIRE per key, one
// HINCRBYFLOAT per second of a minute hash, whose seconds older than a
// minute before the run's latest are then dropped), so a batch of
// settlements on a few counters costs Redis a few calls per counter, not
// 15 per settlement.
// KEYS: 8 per settlement: reserveScript's 7, then the sorted set of
// settled members (score: when the mark may be forgotten). ARGV: now ms,
// how long in ms a settled mark is kept, then per settlement: actual,
// member, its time in s, the TTL in ms of its hour, day and month keys.
// Returns how many settlements charged or released something.
var settleScript = redis.NewScript(`
local nowms = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local n = 0
local marks, rel, relz, add, ttl, hash, top = {}, {}, {}, {}, {}, {}, {}
for c = 0, #KEYS / 8 - 1 do
  local kb, ab = c * 8, 3 + c * 6
  local actual, member = tonumber(ARGV[ab]), ARGV[ab + 1]
  local counts = true
  if member ~= '' then
    local sd = KEYS[kb + 8]
    if marks[sd] == nil then
      redis.call('ZREMRANGEBYSCORE', sd, '-inf', nowms)
      marks[sd] = false
    end
    if redis.call('ZADD', sd, 'NX', nowms + keep, member) == 0 then
      counts = false
    else
      marks[sd] = true
      local rs = KEYS[kb + 6]
      relz[rs] = KEYS[kb + 7]
      if rel[rs] == nil then rel[rs] = 0 end
      if redis.call('ZREM', KEYS[kb + 7], member) == 1 then
        rel[rs] = rel[rs] + tonumber(string.match(member, ':([^:]*)$'))
      end
    end
  end
  if counts then
    n = n + 1
    if actual > 0 then
      for i = 1, 4 do
        local k = KEYS[kb + i]
        add[k] = (add[k] or 0) + actual
        if i < 4 then ttl[k] = ARGV[ab + 2 + i] end
      end
      local h, sec = KEYS[kb + 5], ARGV[ab + 2]
      if hash[h] == nil then hash[h], top[h] = {}, tonumber(sec) end
      hash[h][sec] = (hash[h][sec] or 0) + actual
      if tonumber(sec) > top[h] then top[h] = tonumber(sec) end
    end
  end
end
for sd, added in pairs(marks) do
  if added then redis.call('PEXPIRE', sd, keep + 60000) end
end
for rs, sum in pairs(rel) do
  if sum > 0 then redis.call('INCRBYFLOAT', rs, -sum) end
  if redis.call('ZCARD', relz[rs]) == 0 then redis.call('DEL', rs) end
end
for k, v in pairs(add) do
  redis.call('INCRBYFLOAT', k, v)
  if ttl[k] then redis.call('PEXPIRE', k, ttl[k]) end
end
for h, secs in pairs(hash) do
  for sec, v in pairs(secs) do redis.call('HINCRBYFLOAT', h, sec, v) end
  for _, f in ipairs(redis.call('HKEYS', h)) do
    if tonumber(f) < top[h] - 60 then redis.call('HDEL', h, f) end
  end
  redis.call('PEXPIRE', h, 62000)
end
return n
`)

// SettleAll implements [Settler] with one script run for every
// settlement of ss. All keys must be served by one Redis node (a single
// Redis, or keys in one Cluster slot). When Redis cannot be reached, the
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
				list = append(list, orphan{s.Key, s.ID, s.Actual, now})
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
	return orphan{res.key, member, actual, now}, true
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
// run that long (about 7 µs of Redis time each, a request on 9 counters
// about 70 µs) delays the admissions queued behind it on Redis by a
// millisecond or two at most.
const maxSettleBatch = 128

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
				r.orph.add(o.key, o.member, o.actual, o.at)
			}
		}
	}
	for _, c := range batch {
		c.err = err
		c.deliver()
	}
}

// settleMany runs settleScript once for list, each settlement at its own
// time.
func (r *Redis) settleMany(ctx context.Context, op string, list []orphan) error {
	keys := make([]string, 0, 8*len(list))
	args := make([]any, 0, 2+6*len(list))
	args = append(args, time.Now().UnixMilli(), (r.cfg.ReservationTTL + time.Minute).Milliseconds())
	for _, o := range list {
		keys = append(keys, r.counterKeys(o.key, o.at)...)
		keys = append(keys, r.settledKey(o.key))
		args = append(args, o.actual, o.member, o.at.Unix())
		for w := Hour; w <= Month; w++ {
			args = append(args, (calRetry(w, o.at) + calendarGrace).Milliseconds())
		}
	}
	return r.run(ctx, op, func(cctx context.Context) error {
		return settleScript.Run(cctx, r.c, keys, args...).Err()
	})
}

var (
	_ Settler = (*Local)(nil)
	_ Settler = (*Redis)(nil)
)
