package limit

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Charge is one counter a request is admitted on: the counter's key, the
// request's estimate in the counter's unit, and the limits on that key.
type Charge struct {
	Key    string
	Amount float64
	Limits []Limit
}

// Admitter admits a request on several counters at once, all or none: a
// request under budgets on its token, its team and its service, in
// tokens and in USD, is checked against every one (the rule of [Limit])
// and reserves its estimate on each only when all admit it. Nothing is
// held for a refused request, so a refusal by one scope never leaves a
// reservation on another. [Local] takes the locks of every counter
// involved; [Redis] runs one Lua script (one round trip).
type Admitter interface {
	// ReserveAll checks charges and, when every one admits, reserves
	// each. res and ds must be at least len(charges) long; ds[i] is the
	// decision for charges[i] and, when admitted, res[i] its reservation
	// (to settle with [Counter.Settle]). which is -1 when the request is
	// admitted, else the index of the refusing charge (when several
	// refuse, the first), whose refusal is ds[which]. A charge with no
	// limits is admitted and holds nothing. Keys should be distinct.
	ReserveAll(ctx context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (which int, err error)
}

func validateAll(charges []Charge, res []Reservation, ds []Decision) error {
	if len(res) < len(charges) || len(ds) < len(charges) {
		return fmt.Errorf("%w: %d charges, room for %d reservations and %d decisions", ErrInvalidLimit, len(charges), len(res), len(ds))
	}
	for _, c := range charges {
		if err := validate(c.Amount, c.Limits); err != nil {
			return err
		}
	}
	return nil
}

// ReserveAll implements [Admitter]. It returns an error only for an
// invalid limit or amount.
func (l *Local) ReserveAll(_ context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (int, error) {
	if err := validateAll(charges, res, ds); err != nil || len(charges) == 0 {
		return -1, err
	}
	var shards [16]int
	idx := shards[:0]
	for _, c := range charges {
		if i := l.shard(c.Key); !slices.Contains(idx, i) {
			idx = append(idx, i)
		}
	}
	slices.Sort(idx) // one lock order for every caller
	for _, i := range idx {
		l.count[i].mu.Lock()
	}
	defer func() {
		for _, i := range idx {
			l.count[i].mu.Unlock()
		}
	}()
	t := now.UnixNano()
	for i, c := range charges {
		e := l.count[l.shard(c.Key)].get(c.Key)
		e.expire(t)
		ds[i] = l.check(e, c.Amount, c.Limits, now)
		if !ds[i].Allowed {
			return i, nil
		}
	}
	for i, c := range charges {
		res[i] = l.hold(l.count[l.shard(c.Key)].get(c.Key), c.Key, c.Amount, t)
	}
	return -1, nil
}

// reserveManyScript is [Redis.ReserveAll]: reserveScript's check for every
// charge, then, when all admit, its reservation for every charge.
// KEYS: 7 per charge, as reserveScript. ARGV: now ms, now s, ttl ms,
// number of charges, whether the epoch key (the last KEY) must exist,
// then per charge: amount, member, n, then n ×
// (window, warn, block, calendar retry ms). Returns {which (0: admitted,
// else the 1-based refusing charge), then per charge checked: check's
// reply (see admitLua)}, or {-1} when the epoch key must exist and does
// not.
var reserveManyScript = redis.NewScript(`
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {-1} end
local now = tonumber(ARGV[1])
local sec = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local nc = tonumber(ARGV[4])

` + admitLua + `
local out = {0}
local ab = 6
for c = 1, nc do
  local kb = (c - 1) * 7 + 1
  local amount = tonumber(ARGV[ab])
  local reserved = expire(KEYS[kb + 5], KEYS[kb + 6])
  local d = check(kb, ab + 2, amount, reserved)
  for _, v in ipairs(d) do table.insert(out, v) end
  if d[1] == 0 then
    out[1] = c
    return out
  end
  ab = ab + 3 + 4 * tonumber(ARGV[ab + 2])
end
ab = 6
for c = 1, nc do
  local kb = (c - 1) * 7 + 1
  local amount = tonumber(ARGV[ab])
  if amount > 0 then
    redis.call('ZADD', KEYS[kb + 6], now + ttl, ARGV[ab + 1])
    redis.call('INCRBYFLOAT', KEYS[kb + 5], amount)
    redis.call('PEXPIRE', KEYS[kb + 6], ttl + 60000)
    redis.call('PEXPIRE', KEYS[kb + 5], ttl + 60000)
  end
  ab = ab + 3 + 4 * tonumber(ARGV[ab + 2])
end
return out
`)

// ReserveAll implements [Admitter] with one script run. All keys must be
// served by one Redis node (a single Redis, or keys in one Cluster slot).
// When Redis cannot be reached, it follows the budget fail policy for the
// whole request: refuse (FailClosedBudget), admit (the default), or, with
// FailLocalBudget, admit against this replica's local share of each
// counter's remaining budget (see [localShare]). With RequireSeed, a call
// that finds Redis unseeded waits (at most SeedWait) for the seed and
// tries again. It returns an error for an invalid limit or amount, or
// when ctx is done.
func (r *Redis) ReserveAll(ctx context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (int, error) {
	if err := validateAll(charges, res, ds); err != nil || len(charges) == 0 {
		return -1, err
	}
	which, unseeded, err := r.reserveAll(ctx, charges, res, ds, now)
	if err == nil && unseeded {
		if r.cfg.OnUnseeded != nil {
			r.cfg.OnUnseeded()
		}
		if r.awaitSeed(ctx) {
			which, unseeded, err = r.reserveAll(ctx, charges, res, ds, now)
		}
	}
	switch {
	case err != nil && errors.Is(err, ErrUnavailable), err == nil && unseeded:
		return r.failBudget(charges, res, ds), nil
	case err != nil:
		return -1, err
	}
	return which, nil
}

// failBudget fills res and ds per the budget fail policy and returns
// ReserveAll's which.
func (r *Redis) failBudget(charges []Charge, res []Reservation, ds []Decision) int {
	if r.cfg.FailLocalBudget {
		return r.share.reserve(r, charges, res, ds)
	}
	for i, c := range charges {
		res[i] = Reservation{key: c.Key, amount: c.Amount, done: new(atomic.Bool)}
		ds[i] = Decision{Allowed: !r.cfg.FailClosedBudget, Degraded: true}
	}
	if r.cfg.FailClosedBudget {
		ds[0].RetryAfter = failRetry
		return 0
	}
	return -1
}

// reserveAll runs reserveManyScript once. unseeded reports that Redis
// holds no epoch key (with RequireSeed): nothing was checked.
func (r *Redis) reserveAll(ctx context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (which int, unseeded bool, err error) {
	keys := make([]string, 0, 7*len(charges)+1)
	args := make([]any, 0, 5+len(charges)*7)
	seed := 0
	if r.cfg.RequireSeed {
		seed = 1
	}
	args = append(args, now.UnixMilli(), now.Unix(), r.cfg.ReservationTTL.Milliseconds(), len(charges), seed)
	members := make([]string, len(charges))
	for i, c := range charges {
		keys = append(keys, r.counterKeys(c.Key, now)...)
		if c.Amount > 0 {
			members[i] = r.id() + ":" + strconv.FormatFloat(c.Amount, 'g', -1, 64)
		}
		args = append(args, c.Amount, members[i], len(c.Limits))
		for _, l := range c.Limits {
			args = append(args, int(l.Window), l.Warn, l.Block, calRetry(l.Window, now).Milliseconds())
		}
	}
	keys = append(keys, r.epochKey())
	var rooms []float64
	which = -1
	err = r.run(ctx, "reserve", func(cctx context.Context) error {
		out, err := reserveManyScript.Run(cctx, r.c, keys, args...).Slice()
		if err == nil && len(out) == 1 {
			if v, _ := out[0].(int64); v == -1 {
				unseeded = true
				return nil
			}
		}
		if err == nil {
			which, rooms, err = parseReserveMany(out, charges, ds)
		}
		return err
	})
	if err != nil {
		if !errors.Is(err, gobreaker.ErrOpenState) && !errors.Is(err, gobreaker.ErrTooManyRequests) {
			// The script may have run and reserved: release what it
			// may hold once Redis answers.
			for i, c := range charges {
				if members[i] != "" {
					r.orph.add(c.Key, members[i], 0, now)
				}
			}
		}
		return -1, false, err
	}
	if unseeded {
		return -1, true, nil
	}
	if r.cfg.FailLocalBudget {
		r.share.seen(charges, rooms)
	}
	if which >= 0 {
		return which, false, nil
	}
	for i, c := range charges {
		res[i] = Reservation{key: c.Key, amount: c.Amount, done: new(atomic.Bool)}
		if c.Amount > 0 {
			res[i].recorded, res[i].member = true, members[i]
		}
	}
	return -1, false, nil
}

func parseReserveMany(out []any, charges []Charge, ds []Decision) (int, []float64, error) {
	if len(out) < 1 {
		return -1, nil, fmt.Errorf("unexpected reply %v", out)
	}
	refused, _ := out[0].(int64)
	n := (len(out) - 1) / 7
	if (len(out)-1)%7 != 0 || n > len(charges) || (refused == 0 && n != len(charges)) || (refused > 0 && int(refused) != n) {
		return -1, nil, fmt.Errorf("unexpected reply %v", out)
	}
	rooms := make([]float64, n)
	for i := range n {
		d, room, err := parseReserve(out[1+7*i:8+7*i], charges[i].Limits)
		if err != nil {
			return -1, nil, err
		}
		ds[i], rooms[i] = d, room
	}
	return int(refused) - 1, rooms, nil
}

var (
	_ Admitter = (*Local)(nil)
	_ Admitter = (*Redis)(nil)
)
