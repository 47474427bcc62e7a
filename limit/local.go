package limit

import (
	"context"
	"fmt"
	"hash/maphash"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

const localShards = 64 // power of two

// LocalConfig configures a [Local] backend. The zero value is ready to use.
type LocalConfig struct {
	// MaxRateKeys bounds how many keys the rate limiter remembers; the
	// least recently used key beyond it is forgotten (it starts afresh on
	// its next request). Keys whose last admission left the window are
	// dropped sooner, lazily, since they hold no state. If zero, 10000.
	MaxRateKeys int `json:"max_rate_keys,omitempty"`
	// ReservationTTL is how long an unsettled reservation is held before it
	// is released (a caller that never settles cannot hold budget
	// forever). A later Settle still charges its actual amount. If zero,
	// 15 minutes.
	ReservationTTL time.Duration `json:"reservation_ttl,omitempty"`
}

// Local is an in-process [Backend]: exact per-key request rate limits and
// windowed counters with reservations, held in memory. It counts for one
// process only; use [Redis] to share limits across replicas. Local is safe
// for concurrent use and starts no goroutine.
//
// Memory: a rate key costs about 100 bytes plus 8 bytes per unit of its
// limit up to 1024 (the times of its admissions in the last minute), or
// 256 bytes above, for at most MaxRateKeys keys. A counter key costs about 700 bytes and is kept until the
// process exits (Total never resets, so forgetting a key would forget its
// spend); counter keys are clients from configuration, so their number is
// bounded by it.
type Local struct {
	seed   maphash.Seed
	resTTL time.Duration
	nextID atomic.Uint64
	rate   [localShards]rateShard
	count  [localShards]countShard
}

type rateShard struct {
	mu  sync.Mutex // protects lru and every entry in it
	lru *simplelru.LRU[string, *rateEntry]
	_   [40]byte // keep shards on separate cache lines
}

// exactRateMax is the largest limit Allow keeps an exact log for; above
// it, per-second counts.
const exactRateMax = 1024

// rateEntry is a sliding-window log: the admission times (Unix nanoseconds)
// of the last len(ts) admissions, oldest at head. For limits above
// exactRateMax it holds per-second counts in secs instead.
type rateEntry struct {
	ts   []int64
	head int
	n    int
	last int64 // newest admission, Unix nanoseconds
	secs *secCounts
}

// secCounts counts admissions per second: an admission during second s
// counts while the current second is <= s+60, so for at least a minute.
type secCounts struct {
	last int64 // newest second advanced to
	b    [64]int32
}

type countShard struct {
	mu sync.Mutex // protects m and every entry in it
	m  map[string]*countEntry
	_  [48]byte
}

type calWindow struct {
	start int64 // Unix second the window starts
	end   int64 // and the one the next starts (0 until set)
	used  float64
}

// in reports whether the Unix second sec falls in the window.
func (c *calWindow) in(sec int64) bool { return sec >= c.start && sec < c.end }

type countEntry struct {
	cal      [3]calWindow // Hour, Day, Month
	total    float64
	minute   secRing
	reserved float64
	res      map[uint64]heldRes
	nextExp  int64 // earliest reservation expiry, Unix nanoseconds
}

type heldRes struct {
	amount float64
	exp    int64
}

// secRing holds per-second amounts for the sliding minute: an amount
// charged during second s counts while the current second is <= s+60.
type secRing struct {
	last int64 // newest second advanced to
	b    [64]float64
}

// NewLocal returns a [Local] backend configured by c.
func NewLocal(c LocalConfig) (*Local, error) {
	if c.MaxRateKeys < 0 || c.ReservationTTL < 0 {
		return nil, fmt.Errorf("limit: invalid LocalConfig %+v", c)
	}
	if c.MaxRateKeys == 0 {
		c.MaxRateKeys = 10000
	}
	if c.ReservationTTL == 0 {
		c.ReservationTTL = 15 * time.Minute
	}
	l := &Local{seed: maphash.MakeSeed(), resTTL: c.ReservationTTL}
	per := (c.MaxRateKeys + localShards - 1) / localShards
	for i := range l.rate {
		lru, err := simplelru.NewLRU[string, *rateEntry](per, nil)
		if err != nil {
			return nil, err
		}
		l.rate[i].lru = lru
		l.count[i].m = make(map[string]*countEntry)
	}
	return l, nil
}

func (l *Local) shard(key string) int {
	return int(maphash.String(l.seed, key) & (localShards - 1))
}

// Allow implements [Limiter]. It admits when fewer than limit admissions
// for key happened in (now-RateWindow, now]; for limits up to 1024 it is
// exact to the nanosecond (a log of admission times). Above 1024 it counts
// per second, conservatively: still never more than limit in any minute,
// but a refusal may last up to one second longer than exact. A now earlier
// than key's newest admission is taken as that admission's time. It never
// returns an error.
func (l *Local) Allow(_ context.Context, key string, limit int, now time.Time) (Decision, error) {
	if limit <= 0 {
		return Decision{Allowed: true}, nil
	}
	t := now.UnixNano()
	s := &l.rate[l.shard(key)]
	s.mu.Lock()
	e, ok := s.lru.Get(key)
	if !ok {
		e = &rateEntry{}
		s.lru.Add(key, e)
	}
	d := e.allow(t, limit)
	// Lazily drop one idle key: its admissions all left the window, so it
	// holds no state.
	if k, old, ok := s.lru.GetOldest(); ok && old != e && t-old.last >= int64(RateWindow) {
		s.lru.Remove(k)
	}
	s.mu.Unlock()
	return d, nil
}

func (e *rateEntry) allow(t int64, limit int) Decision {
	if t < e.last {
		t = e.last
	}
	if limit > exactRateMax {
		return e.allowCoarse(t, limit)
	}
	if len(e.ts) != limit {
		e.resize(limit)
	}
	win := int64(RateWindow)
	// Forget admissions that left the window.
	for e.n > 0 && t-e.ts[e.head] >= win {
		e.head++
		if e.head == len(e.ts) {
			e.head = 0
		}
		e.n--
	}
	lim := Limit{Window: Minute, Block: float64(limit)}
	if e.n == limit {
		return Decision{Limit: lim, Used: float64(e.n), RetryAfter: time.Duration(e.ts[e.head] + win - t)}
	}
	i := e.head + e.n
	if i >= len(e.ts) {
		i -= len(e.ts)
	}
	e.ts[i] = t
	e.n++
	e.last = t
	return Decision{Allowed: true, Limit: lim, Used: float64(e.n)}
}

// allowCoarse admits against per-second counts: never more than limit in
// any minute, but a request may be refused up to a second longer than the
// exact log would.
func (e *rateEntry) allowCoarse(t int64, limit int) Decision {
	if e.secs == nil {
		e.secs = &secCounts{}
		e.ts, e.head, e.n = nil, 0, 0 // limit was raised: start afresh
	}
	c := e.secs
	sec := floorDiv(t, int64(time.Second))
	if sec > c.last {
		if sec-c.last >= int64(len(c.b)) {
			c.b = [64]int32{}
		} else {
			for s := c.last + 1; s <= sec; s++ {
				c.b[s&63] = 0
			}
		}
		c.last = sec
	}
	n := 0
	for s := sec - 60; s <= sec; s++ {
		n += int(c.b[s&63])
	}
	lim := Limit{Window: Minute, Block: float64(limit)}
	if n >= limit {
		left := n
		for s := sec - 60; s <= sec; s++ {
			left -= int(c.b[s&63])
			if left < limit {
				return Decision{Limit: lim, Used: float64(n), RetryAfter: time.Duration((s+61)*int64(time.Second) - t)}
			}
		}
	}
	c.b[sec&63]++
	e.last = t
	return Decision{Allowed: true, Limit: lim, Used: float64(n + 1)}
}

// resize keeps the newest min(n, limit) admissions.
func (e *rateEntry) resize(limit int) {
	e.secs = nil
	ts := make([]int64, limit)
	keep := min(e.n, limit)
	for j := range keep {
		ts[j] = e.ts[(e.head+e.n-keep+j)%len(e.ts)]
	}
	e.ts, e.head, e.n = ts, 0, keep
}

// Reserve implements [Counter]. It returns an error only for an invalid
// limit or amount.
func (l *Local) Reserve(_ context.Context, key string, amount float64, limits []Limit, now time.Time) (Reservation, Decision, error) {
	if err := validate(amount, limits); err != nil {
		return Reservation{}, Decision{}, err
	}
	t := now.UnixNano()
	s := &l.count[l.shard(key)]
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(key)
	e.expire(t)
	d := l.check(e, amount, limits, now)
	if !d.Allowed {
		return Reservation{}, d, nil
	}
	return l.hold(e, key, amount, t), d, nil
}

// check evaluates limits on e for a request of amount; the caller holds
// e's shard lock and has expired its reservations.
func (l *Local) check(e *countEntry, amount float64, limits []Limit, now time.Time) Decision {
	sec := now.Unix()
	return check(limits, amount, e.reserved,
		func(w Window) float64 { return e.used(w, now) },
		func(lim Limit, _ float64) time.Duration {
			if lim.Window == Minute {
				return e.minute.retry(sec, now, e.reserved, lim.Block)
			}
			return calRetry(lim.Window, now)
		})
}

// hold reserves amount on e (nothing for a zero amount); the caller holds
// e's shard lock.
func (l *Local) hold(e *countEntry, key string, amount float64, t int64) Reservation {
	r := Reservation{key: key, amount: amount, done: new(atomic.Bool)}
	if amount > 0 {
		r.id = l.nextID.Add(1)
		r.recorded = true
		exp := t + int64(l.resTTL)
		if e.res == nil {
			e.res = make(map[uint64]heldRes)
		}
		if len(e.res) == 0 || exp < e.nextExp {
			e.nextExp = exp
		}
		e.res[r.id] = heldRes{amount: amount, exp: exp}
		e.reserved += amount
	}
	return r
}

// Settle implements [Counter].
func (l *Local) Settle(_ context.Context, r Reservation, actual float64, now time.Time) error {
	if !r.settleOnce() {
		return nil
	}
	if actual < 0 || actual != actual {
		actual = 0
	}
	s := &l.count[l.shard(r.key)]
	s.mu.Lock()
	e := s.get(r.key)
	if r.recorded {
		if h, ok := e.res[r.id]; ok {
			delete(e.res, r.id)
			e.release(h.amount)
		}
	}
	e.add(actual, now)
	s.mu.Unlock()
	return nil
}

// Add implements [Counter].
func (l *Local) Add(_ context.Context, key string, amount float64, now time.Time) error {
	if amount < 0 || amount != amount {
		return fmt.Errorf("%w: amount %v", ErrInvalidLimit, amount)
	}
	s := &l.count[l.shard(key)]
	s.mu.Lock()
	s.get(key).add(amount, now)
	s.mu.Unlock()
	return nil
}

// Usage implements [Counter].
func (l *Local) Usage(_ context.Context, key string, w Window, now time.Time) (float64, error) {
	if !w.valid() {
		return 0, fmt.Errorf("%w: window %d", ErrInvalidLimit, uint8(w))
	}
	s := &l.count[l.shard(key)]
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.m[key]
	if !ok {
		return 0, nil
	}
	return e.used(w, now), nil
}

// Close implements [Backend]. Local holds no goroutine; Close is a no-op.
func (l *Local) Close() error { return nil }

func (s *countShard) get(key string) *countEntry {
	e, ok := s.m[key]
	if !ok {
		e = &countEntry{}
		s.m[key] = e
	}
	return e
}

func (e *countEntry) release(a float64) {
	e.reserved -= a
	if len(e.res) == 0 || e.reserved < 0 {
		e.reserved = 0 // no float drift once nothing is held
	}
}

// expire releases reservations whose TTL passed.
func (e *countEntry) expire(t int64) {
	if len(e.res) == 0 || t < e.nextExp {
		return
	}
	next := int64(math.MaxInt64)
	for id, h := range e.res {
		if t >= h.exp {
			delete(e.res, id)
			e.release(h.amount)
		} else if h.exp < next {
			next = h.exp
		}
	}
	e.nextExp = next
}

func (e *countEntry) used(w Window, now time.Time) float64 {
	switch w {
	case Minute:
		return e.minute.sum(now.Unix())
	case Total:
		return e.total
	}
	c := &e.cal[w-Hour]
	if !c.in(now.Unix()) && c.start != calStart(w, now) {
		return 0
	}
	return c.used
}

// add charges a to every window containing now. A now in a calendar window
// older than the one already counted does not touch that window.
func (e *countEntry) add(a float64, now time.Time) {
	if a == 0 {
		return
	}
	sec := now.Unix()
	for w := Hour; w <= Month; w++ {
		c := &e.cal[w-Hour]
		if c.in(sec) {
			c.used += a // the window's bounds are known: no calendar sums
			continue
		}
		st := calStart(w, now)
		if st > c.start {
			c.start, c.end, c.used = st, calEnd(w, st), 0
		}
		if st == c.start {
			c.used += a
		}
	}
	e.total += a
	e.minute.add(now.Unix(), a)
}

func (r *secRing) advance(sec int64) {
	if sec <= r.last {
		return
	}
	if sec-r.last >= int64(len(r.b)) {
		r.b = [64]float64{}
	} else {
		for s := r.last + 1; s <= sec; s++ {
			r.b[s&63] = 0
		}
	}
	r.last = sec
}

func (r *secRing) add(sec int64, a float64) {
	r.advance(sec)
	if sec >= r.last-60 {
		r.b[sec&63] += a
	}
}

func (r *secRing) sum(sec int64) float64 {
	var u float64
	for s := max(sec-60, r.last-63); s <= min(sec, r.last); s++ {
		u += r.b[s&63]
	}
	return u
}

// retry returns how long after now the minute usage drops enough that
// usage plus reserved is below block; RateWindow when usage leaving the
// window is not enough.
func (r *secRing) retry(sec int64, now time.Time, reserved, block float64) time.Duration {
	u := r.sum(sec)
	for s := max(sec-60, r.last-63); s <= min(sec, r.last); s++ {
		u -= r.b[s&63]
		if r.b[s&63] != 0 && u+reserved < block {
			return time.Unix(s+61, 0).Sub(now)
		}
	}
	return RateWindow
}

var _ Backend = (*Local)(nil)
