package limit

import (
	"context"
	"errors"
	"fmt"
	"slices"
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
// open, after which one call probes Redis (half-open) while the others
// wait for its answer (see [Redis.run]). So while Redis is down a request
// pays the Timeout at most once per open period, and most pay nothing.
// onChange is called on every state change, under the breaker's lock.
func newBreaker(open time.Duration, onChange func(from, to gobreaker.State)) *gobreaker.CircuitBreaker[struct{}] {
	return gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        "redis",
		MaxRequests: 1,
		Timeout:     open,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= breakerTrip },
		IsSuccessful: func(err error) bool {
			return err == nil || errors.Is(err, redis.Nil)
		},
		IsExcluded:    func(err error) bool { return errors.Is(err, errCallerGone) },
		OnStateChange: func(_ string, from, to gobreaker.State) { onChange(from, to) },
	})
}

// breaker is the circuit breaker in front of Redis and what calls wait on
// while it is half-open. The background watcher replaces a breaker that
// is open by a fresh (closed) one as soon as Redis answers a PING, so that
// Redis coming back is noticed within watchTick rather than after the
// open period.
type breaker struct {
	cb     atomic.Pointer[gobreaker.CircuitBreaker[struct{}]]
	onOpen func(open bool) // called when the breaker opens and closes
	mu     sync.Mutex      // protects half
	half   chan struct{}   // closed when the half-open probe has its answer
}

func (b *breaker) reset(open time.Duration) {
	b.cb.Store(newBreaker(open, b.changed))
	b.probed()
	b.onOpen(false)
}

func (b *breaker) changed(from, to gobreaker.State) {
	switch to {
	case gobreaker.StateOpen:
		b.onOpen(true)
	case gobreaker.StateClosed:
		b.onOpen(false)
	}
	if from == gobreaker.StateHalfOpen {
		b.probed()
	}
	if to == gobreaker.StateHalfOpen {
		b.mu.Lock()
		b.half = make(chan struct{})
		b.mu.Unlock()
	}
}

func (b *breaker) probed() {
	b.mu.Lock()
	if b.half != nil {
		close(b.half)
		b.half = nil
	}
	b.mu.Unlock()
}

// waitProbe waits, at most d, for the half-open breaker's probe to be
// answered.
func (b *breaker) waitProbe(ctx context.Context, d time.Duration) {
	b.mu.Lock()
	ch := b.half
	b.mu.Unlock()
	if ch == nil {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-ctx.Done():
	}
}

// run calls f with a context bounded by Timeout through the breaker. It
// returns nil, ctx's own error when the caller went away, or an error
// wrapping [ErrUnavailable] (Redis failed or the breaker is open). A call
// that finds the breaker half-open with its one probe in flight waits
// for the probe's answer (at most Timeout, which the probe is bounded by)
// and then tries once more: a hiccup that opened the breaker does not
// send the concurrent calls after it to the fail policies.
func (r *Redis) run(ctx context.Context, op string, f func(context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	call := func() (struct{}, error) {
		cctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		defer cancel()
		err := f(cctx)
		if err != nil && !errors.Is(err, redis.Nil) && ctx.Err() != nil {
			return struct{}{}, fmt.Errorf("%w: %w", errCallerGone, err)
		}
		return struct{}{}, err
	}
	_, err := r.br.cb.Load().Execute(call)
	if errors.Is(err, gobreaker.ErrTooManyRequests) {
		r.br.waitProbe(ctx, r.cfg.Timeout)
		_, err = r.br.cb.Load().Execute(call)
	}
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		r.ok()
		return err
	case ctx.Err() != nil:
		return ctx.Err()
	}
	return r.failed(ctx, op, err)
}

// Down reports whether the breaker in front of Redis is open (or
// half-open, probing): admission is following the fail policies.
func (r *Redis) Down() bool { return r.down.Load() }

// Failures returns how many calls to Redis failed or were refused by the
// open breaker since the backend was made.
func (r *Redis) Failures() uint64 { return r.failures.Load() }

// orphans are settlements owed to Redis: reservations whose reserve call
// failed after it may have reached Redis (a timeout: the reply was lost,
// so nobody will settle them; released at 0 instead of being held until
// their TTL), and settles that failed (replayed with their actual). Both
// are replayed by the watcher once Redis answers again, idempotently by
// member.
type orphans struct {
	mu   sync.Mutex // protects list
	list []orphan
}

// orphan is one counter's settlement of a request: actual charged to
// key at at and, when member is set, the reservation of charge part of
// the request whose record is member (held: its amount) released, once
// per member and part (see settleScript).
type orphan struct {
	key, member  string
	part         int
	held, actual float64
	at           time.Time
}

// maxOrphans caps the reservations remembered for release; beyond it
// they are left to their TTL.
const maxOrphans = 10000

func (o *orphans) add(x orphan) {
	o.mu.Lock()
	if len(o.list) < maxOrphans {
		o.list = append(o.list, x)
	}
	o.mu.Unlock()
}

func (o *orphans) pending() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.list) > 0
}

func (o *orphans) take() []orphan {
	o.mu.Lock()
	defer o.mu.Unlock()
	l := o.list
	o.list = nil
	return l
}

// lookForSeed, with RequireSeed and OnUnseeded, calls OnUnseeded when
// Redis holds no epoch key: Redis that comes back from an outage empty
// (restarted without persistence) is re-seeded at once, not when the
// first budgeted request finds it unseeded and has to wait for the seed.
func (r *Redis) lookForSeed() {
	if !r.cfg.RequireSeed || r.cfg.OnUnseeded == nil {
		return
	}
	if seeded, err := r.seeded(); err == nil && !seeded {
		r.cfg.OnUnseeded()
	}
}

// watchTick is how often the background watcher of a [Redis] looks at
// the breaker (PING while it is open) and at the queued settlements.
const watchTick = 100 * time.Millisecond

// watch is the one background goroutine of a [Redis], until Close: while
// the breaker is open it PINGs Redis every tick and closes the breaker as
// soon as Redis answers (and then, with RequireSeed, looks for a
// restart-empty, see lookForSeed); otherwise it replays the queued settlements
// (woken at once by a call that succeeds) and, with FailLocalBudget,
// keeps this replica's heartbeat.
func (r *Redis) watch(tick time.Duration) {
	defer close(r.done)
	t := time.NewTicker(tick)
	defer t.Stop()
	var beat time.Time
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		case <-r.wake:
		case <-r.back:
			r.lookForSeed()
		}
		if r.br.cb.Load().State() == gobreaker.StateOpen {
			r.probe()
			continue
		}
		r.replayOrphans()
		if r.cfg.FailLocalBudget && time.Since(beat) >= heartbeatEvery {
			r.heartbeat()
			beat = time.Now()
		}
	}
}

// probe closes an open breaker when Redis answers a PING within Timeout.
func (r *Redis) probe() {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.Timeout)
	defer cancel()
	if r.ping(ctx) != nil {
		return
	}
	r.br.reset(r.cfg.BreakerOpen)
	r.ok()
}

// replayBatch is how many queued settlements one settle script run
// replays.
const replayBatch = 64

// replayOrphans settles the queued orphans, replayBatch per settle script
// run, until they are all done or Redis fails again (the rest wait for
// the next tick).
//
// With RequireSeed, an orphan made before Redis was last seeded (the
// epoch key holds the seed's time) or while it is unseeded is dropped:
// Redis restarted empty since, and the seed from the usage records
// counts the request already (replaying it would count it twice).
func (r *Redis) replayOrphans() {
	list := r.orph.take()
	if len(list) == 0 {
		return
	}
	seeded := int64(0)
	if r.cfg.RequireSeed {
		err := r.run(r.ctx, "release", func(cctx context.Context) error {
			var err error
			seeded, err = r.c.Get(cctx, r.epochKey()).Int64()
			return err
		})
		switch {
		case errors.Is(err, redis.Nil):
			return // unseeded: the seed will count them
		case err != nil:
			for _, o := range list {
				r.orph.add(o)
			}
			return
		}
	}
	list = slices.DeleteFunc(list, func(o orphan) bool { return seeded > o.at.UnixMilli() })
	for i := 0; i < len(list); i += replayBatch {
		batch := list[i:min(i+replayBatch, len(list))]
		if err := r.settleMany(r.ctx, "release", batch); err != nil {
			for _, rest := range list[i:] {
				r.orph.add(rest)
			}
			return
		}
		r.released.Add(uint64(len(batch)))
	}
}

// Close implements [Backend]: it stops the background watcher (settlements
// still queued are left to their reservations' TTL). It does not close the
// client passed to [NewRedis].
func (r *Redis) Close() error {
	r.cancel()
	<-r.done
	return nil
}
