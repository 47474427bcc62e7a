package limit

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"
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

// ReserveAll implements [Admitter] with one script run, shared with the
// calls that arrive while earlier ones are in flight (see [batcher]:
// a burst of N concurrent requests is admitted in a few script runs, each
// request by the same rule and in the same order as if alone). All keys
// must be served by one Redis node.
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

var (
	_ Admitter = (*Local)(nil)
	_ Admitter = (*Redis)(nil)
)
