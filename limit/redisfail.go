package limit

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// errCallerGone marks a Redis call cut short by its caller's own context;
// the breaker does not count it.
var errCallerGone = errors.New("caller gone")

// breakerTrip is how many calls in a row must fail (a timeout, a refused
// connection) for the breaker to open: one slow call under load does not
// make every request fail over to the fail policies.
const breakerTrip = 3

// newBreaker returns the circuit breaker in front of Redis: it opens after
// breakerTrip failed calls in a row and then fails every call at once for
// open, after which one call probes Redis. So while Redis is down a
// request pays the Timeout at most once per open period, and most pay
// nothing.
func newBreaker(open time.Duration) *gobreaker.CircuitBreaker[struct{}] {
	return gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        "redis",
		MaxRequests: 1,
		Timeout:     open,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= breakerTrip },
		IsSuccessful: func(err error) bool {
			return err == nil || errors.Is(err, redis.Nil)
		},
		IsExcluded: func(err error) bool { return errors.Is(err, errCallerGone) },
	})
}

// run calls f with a context bounded by Timeout through the breaker. It
// returns nil, ctx's own error when the caller went away, or an error
// wrapping [ErrUnavailable] (Redis failed or the breaker is open).
func (r *Redis) run(ctx context.Context, op string, f func(context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := r.cb.Execute(func() (struct{}, error) {
		cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		defer cancel()
		err := f(cctx)
		if err != nil && !errors.Is(err, redis.Nil) && ctx.Err() != nil {
			return struct{}{}, fmt.Errorf("%w: %w", errCallerGone, err)
		}
		return struct{}{}, err
	})
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		r.ok()
		return err
	case ctx.Err() != nil:
		return ctx.Err()
	}
	return r.failed(ctx, op, err)
}

// Down reports whether the last call to Redis failed (or was refused by
// the open breaker): admission is following the fail policies.
func (r *Redis) Down() bool { return r.down.Load() }

// Failures returns how many calls to Redis failed or were refused by the
// open breaker since the backend was made.
func (r *Redis) Failures() uint64 { return r.failures.Load() }

// orphans are settlements owed to Redis: reservations whose reserve call
// failed after it may have reached Redis (a timeout: the reply was lost,
// so nobody will settle them; released at 0 instead of being held until
// their TTL), and settles that failed (replayed with their actual). Both
// run once Redis answers again, idempotently by member.
type orphans struct {
	mu      sync.Mutex // protects list
	list    []orphan
	running atomic.Bool
}

type orphan struct {
	key, member string
	actual      float64
	at          time.Time
}

// maxOrphans caps the reservations remembered for release; beyond it
// they are left to their TTL.
const maxOrphans = 10000

func (o *orphans) add(key, member string, actual float64, at time.Time) {
	o.mu.Lock()
	if len(o.list) < maxOrphans {
		o.list = append(o.list, orphan{key, member, actual, at})
	}
	o.mu.Unlock()
}

func (o *orphans) take() []orphan {
	o.mu.Lock()
	defer o.mu.Unlock()
	l := o.list
	o.list = nil
	return l
}

// releaseOrphans releases the remembered orphan reservations, one settle
// script each, in a goroutine that ends when they are released or Redis
// fails again (then they wait for the next success). At most one runs.
func (r *Redis) releaseOrphans() {
	r.orph.mu.Lock()
	n := len(r.orph.list)
	r.orph.mu.Unlock()
	if n == 0 || !r.orph.running.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer r.orph.running.Store(false)
		list := r.orph.take()
		for i, o := range list {
			if err := r.settleMember(context.Background(), "release", o.key, o.member, o.actual, o.at); err != nil {
				for _, rest := range list[i:] {
					r.orph.add(rest.key, rest.member, rest.actual, rest.at)
				}
				return
			}
			r.released.Add(1)
		}
	}()
}
