package limit

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// reserveBatchScript is [Redis.ReserveAll] for a batch of requests, in
// their order: for each request, reserveScript's check on every charge,
// then, when all admit, its reservation on every charge, so a request
// sees the reservations of the requests before it in the batch exactly
// as if each had run its own script. A counter's expired reservations
// are dropped and its settled usage read once per batch; the
// reservations admitted on a counter are written at the end with one
// ZADD and one INCRBYFLOAT.
//
// KEYS: 7 per counter (as reserveScript), then the epoch key. ARGV: ttl
// ms, whether the epoch key must exist, number of requests, then per
// request: now ms, now s, number of charges, then per charge: its
// counter (1-based), amount, member, n, then n × (window, warn, block,
// calendar retry ms). Returns, per request, {which (0: admitted, else
// the 1-based refusing charge), then per charge checked: check's reply
// (see admitLua)}, concatenated; or {-1} when the epoch key must exist
// and does not (nothing checked).
var reserveBatchScript = redis.NewScript(`
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end
local ttl = tonumber(ARGV[1])
local nr = tonumber(ARGV[3])
local now, sec = 0, 0
` + admitLua + `
local resv, adds, sums = {}, {}, {}
local out = {}
local ab = 4
for r = 1, nr do
  now, sec = tonumber(ARGV[ab]), tonumber(ARGV[ab + 1])
  local nc = tonumber(ARGV[ab + 2])
  ab = ab + 3
  local offs = {}
  for c = 1, nc do
    offs[c] = ab
    ab = ab + 4 + 4 * tonumber(ARGV[ab + 3])
  end
  table.insert(out, 0)
  local at = #out
  for c = 1, nc do
    local o = offs[c]
    local kb = (tonumber(ARGV[o]) - 1) * 7 + 1
    if resv[kb] == nil then resv[kb] = expire(KEYS[kb + 5], KEYS[kb + 6]) end
    local d = check(kb, o + 3, tonumber(ARGV[o + 1]), resv[kb])
    for _, v in ipairs(d) do table.insert(out, v) end
    if d[1] == 0 then
      out[at] = c
      break
    end
  end
  if out[at] == 0 then
    for c = 1, nc do
      local o = offs[c]
      local kb = (tonumber(ARGV[o]) - 1) * 7 + 1
      local amount = tonumber(ARGV[o + 1])
      if amount > 0 then
        resv[kb] = resv[kb] + amount
        if adds[kb] == nil then adds[kb], sums[kb] = {}, 0 end
        table.insert(adds[kb], now + ttl)
        table.insert(adds[kb], ARGV[o + 2])
        sums[kb] = sums[kb] + amount
      end
    end
  end
end
for kb, a in pairs(adds) do
  for i = 1, #a, 500 do
    redis.call('ZADD', KEYS[kb + 6], unpack(a, i, math.min(i + 499, #a)))
  end
  redis.call('INCRBYFLOAT', KEYS[kb + 5], sums[kb])
  redis.call('PEXPIRE', KEYS[kb + 6], ttl + 60000)
  redis.call('PEXPIRE', KEYS[kb + 5], ttl + 60000)
end
return out
`)

// maxAdmitBatch is the most requests one batch admits in one script run.
const maxAdmitBatch = 256

// admitCall is one [Redis.ReserveAll] in an admission batch. Everything
// the batch reads is the call's own (built before it is queued), so a
// caller that leaves does not race with the batch.
type admitCall struct {
	callState
	nc      int
	keys    []string // 7 per charge
	args    []any    // now ms, now s, nc, then per charge: counter, amount, member, n, limits
	at      []int    // per charge: where its counter goes in args
	members []string // per charge: its reservation ("" when it holds nothing)
	ckeys   []string // per charge: its key
	now     time.Time
	sent    bool // set by the batch that sends it

	// Set by the batch before done is closed.
	reply    []any // this request's part of the reply
	unseeded bool
	err      error
}

func (r *Redis) newAdmitCall(charges []Charge, now time.Time) *admitCall {
	c := &admitCall{callState: newCallState(), nc: len(charges), now: now,
		keys: make([]string, 0, 7*len(charges)), args: make([]any, 0, 3+8*len(charges)),
		at: make([]int, len(charges)), members: make([]string, len(charges)), ckeys: make([]string, len(charges))}
	c.args = append(c.args, now.UnixMilli(), now.Unix(), len(charges))
	for i, ch := range charges {
		c.keys = append(c.keys, r.counterKeys(ch.Key, now)...)
		c.ckeys[i] = ch.Key
		if ch.Amount > 0 {
			c.members[i] = r.id() + ":" + strconv.FormatFloat(ch.Amount, 'g', -1, 64)
		}
		c.at[i] = len(c.args)
		c.args = append(c.args, 0, ch.Amount, c.members[i], len(ch.Limits))
		for _, l := range ch.Limits {
			c.args = append(c.args, int(l.Window), l.Warn, l.Block, calRetry(l.Window, now).Milliseconds())
		}
	}
	return c
}

// admitFull reports whether an admission batch is full.
func admitFull(batch []*admitCall) bool { return len(batch) >= maxAdmitBatch }

// admitBatch runs reserveBatchScript once for the calls of batch whose
// callers still wait, and delivers each its part of the reply. A call
// whose caller left is released (its reservations queued for release at
// 0) if the script admitted it or may have; so is every call of a batch
// whose script may have run but whose reply was lost.
func (r *Redis) admitBatch(batch []*admitCall) {
	sent := make([]*admitCall, 0, len(batch))
	counters := map[string]int{} // by hour key
	var keys []string
	seed := 0
	if r.cfg.RequireSeed {
		seed = 1
	}
	args := []any{r.cfg.ReservationTTL.Milliseconds(), seed, 0}
	for _, c := range batch {
		if c.gone() {
			continue
		}
		sent = append(sent, c)
		c.sent = true
		for i, p := range c.at {
			ck := c.keys[7*i : 7*i+7]
			n, ok := counters[ck[0]]
			if !ok {
				n = len(counters) + 1
				counters[ck[0]] = n
				keys = append(keys, ck...)
			}
			c.args[p] = n
		}
		args = append(args, c.args...)
	}
	if len(sent) > 0 {
		args[2] = len(sent)
		keys = append(keys, r.epochKey())
		err := r.run(r.ctx, "reserve", func(cctx context.Context) error {
			out, err := reserveBatchScript.Run(cctx, r.c, keys, args...).Slice()
			if err == nil {
				err = splitAdmitReply(out, sent)
			}
			return err
		})
		if err != nil && !errors.Is(err, ErrUnavailable) {
			// The backend is closed (r.ctx done): the fail policy.
			err = fmt.Errorf("%w: reserve: %w", ErrUnavailable, err)
		}
		if err != nil {
			for _, c := range sent {
				c.reply, c.unseeded, c.err = nil, false, err
			}
		}
	}
	for _, c := range batch {
		if c.deliver() || !c.sent {
			continue
		}
		// The caller left: release what the script holds for it.
		if c.err != nil && (errors.Is(c.err, gobreaker.ErrOpenState) || errors.Is(c.err, gobreaker.ErrTooManyRequests)) {
			continue // nothing was sent
		}
		if c.err == nil && (c.unseeded || len(c.reply) == 0 || c.reply[0] != int64(0)) {
			continue // refused or unseeded: nothing held
		}
		c.release(r)
	}
}

// release queues c's reservations for release at 0 (see orphans).
func (c *admitCall) release(r *Redis) {
	for i, m := range c.members {
		if m != "" {
			r.orph.add(c.ckeys[i], m, 0, c.now)
		}
	}
}

// splitAdmitReply gives each call of sent its part of reserveBatchScript's
// reply out.
func splitAdmitReply(out []any, sent []*admitCall) error {
	if len(out) == 1 {
		if v, _ := out[0].(int64); v == -1 {
			for _, c := range sent {
				c.unseeded = true
			}
			return nil
		}
	}
	pos := 0
	for _, c := range sent {
		if pos >= len(out) {
			return fmt.Errorf("unexpected reply: %d values for %d requests", len(out), len(sent))
		}
		which, ok := out[pos].(int64)
		n := int(which)
		if which == 0 {
			n = c.nc
		}
		if !ok || which < 0 || n > c.nc || pos+1+7*n > len(out) {
			return fmt.Errorf("unexpected reply at %d: %v", pos, out[pos])
		}
		c.reply = out[pos : pos+1+7*n]
		pos += 1 + 7*n
	}
	if pos != len(out) {
		return fmt.Errorf("unexpected reply: %d values left", len(out)-pos)
	}
	return nil
}

// reserveAll admits charges in the next admission batch (one script run
// for the requests that arrive while the previous batch is in flight).
// unseeded reports that Redis holds no epoch key (with RequireSeed):
// nothing was checked.
func (r *Redis) reserveAll(ctx context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (which int, unseeded bool, err error) {
	c := r.newAdmitCall(charges, now)
	r.admits.submit(c)
	select {
	case <-c.done:
	case <-ctx.Done():
		if c.leave() {
			return -1, false, ctx.Err()
		}
		<-c.done
	}
	if c.err != nil {
		if !errors.Is(c.err, gobreaker.ErrOpenState) && !errors.Is(c.err, gobreaker.ErrTooManyRequests) {
			// The script may have run and reserved: release what it
			// may hold once Redis answers.
			c.release(r)
		}
		if ctx.Err() != nil {
			return -1, false, ctx.Err()
		}
		return -1, false, c.err
	}
	if c.unseeded {
		return -1, true, nil
	}
	which, rooms, err := parseReserveMany(c.reply, charges, ds)
	if err != nil {
		if c.reply[0] == int64(0) {
			c.release(r)
		}
		return -1, false, fmt.Errorf("%w: reserve: %w", ErrUnavailable, err)
	}
	if r.cfg.FailLocalBudget {
		r.share.seen(charges, rooms)
	}
	if which >= 0 {
		return which, false, nil
	}
	for i, ch := range charges {
		res[i] = Reservation{key: ch.Key, amount: ch.Amount, done: new(atomic.Bool)}
		if ch.Amount > 0 {
			res[i].recorded, res[i].member = true, c.members[i]
		}
	}
	return -1, false, nil
}
