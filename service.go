package keypool

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/keypool/keypool/breaker"
)

// svcState is one service's keys and their live state. It must not be
// copied.
type svcState struct {
	pool *Pool
	name string
	cfg  atomic.Pointer[Service]

	mu      sync.Mutex // protects everything below
	bs      breaker.Settings
	keys    map[string]*keyState
	all     []*keyState
	avail   []*keyState
	heap    []*keyState // min-heap on wakeAt
	cands   Candidates  // what Select sees; reused by every pick
	fit     []*keyState // the keys that fit a request, for the pick's slow path
	pending []Event
	holds   []Hold
	capped  int       // keys out of rotation at their in-flight cap
	ejected int       // keys in StateOpen
	held    int       // keys with held set
	prober  *keyState // the key a probe is out on while every key in rotation is held
	outage  bool      // the last pick found every key held and a probe out or due later
	// probeAfter is when the next probe may go after a failed one.
	probeAfter time.Time
}

// takeEvents returns the events recorded under the lock, for the caller
// to deliver once it is released.
func (s *svcState) takeEvents() []Event { return drain(&s.pending) }

// takeHolds returns the holds recorded under the lock, likewise.
func (s *svcState) takeHolds() []Hold { return drain(&s.holds) }

// drain returns a copy of *q, or nil when it is empty, and empties *q
// keeping its storage.
func drain[T any](q *[]T) []T {
	if len(*q) == 0 {
		return nil
	}
	out := append([]T(nil), *q...)
	*q = (*q)[:0]
	return out
}

func (s *svcState) load(svc Service, bs breaker.Settings, keys []Key, now time.Time) []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg.Store(&svc)
	s.bs = bs
	next := make(map[string]*keyState, len(keys))
	all := make([]*keyState, 0, len(keys))
	for i := range keys {
		k := keys[i]
		c := s.keys[k.ID]
		if c != nil && c.key.Secret != k.Secret {
			s.retire(c)
			c = nil
		}
		if c == nil {
			c = newKeyState(s, &k)
			s.admit(c)
		} else {
			if d := k.BalanceUsed - c.key.BalanceUsed; d > 0 {
				c.spent = math.Max(0, c.spent-d)
			}
			c.key = &k
		}
		c.limiter = s.limiterFor(&k, c.limiter, now)
		for f, l := range c.featLim {
			if rpm := k.Features[f]; rpm <= 0 || float64(l.Limit()) != float64(rpm)/60 {
				delete(c.featLim, f)
			}
		}
		c.maxIn = int64(k.MaxInFlight)
		if c.maxIn == 0 {
			c.maxIn = int64(svc.MaxInFlight)
		}
		if k.State != c.storedSt {
			c.storedSt = k.State
			s.setState(c, k.State, time.Time{}, k.Reason, now)
		} else if c.state == StateExhausted && c.until.IsZero() && k.BalanceTotal > 0 && c.remaining() > 0 {
			// Topped up, or the quota was reset by its owner.
			s.setState(c, StateActive, time.Time{}, "", now)
		}
		s.checkCap(c)
		next[k.ID] = c
		all = append(all, c)
	}
	for id, c := range s.keys {
		if next[id] == nil {
			s.retire(c)
		}
	}
	s.keys, s.all = next, all
	s.cands = Candidates{}
	return s.takeEvents()
}

func (s *svcState) limiterFor(k *Key, old *rate.Limiter, now time.Time) *rate.Limiter {
	rpm := k.RateLimitRPM
	if rpm == 0 {
		rpm = s.cfg.Load().RateLimitRPM
	}
	if rpm <= 0 {
		return nil
	}
	burst := rateBurst(rpm, s.cfg.Load().RateBurst)
	lim := rate.Limit(float64(rpm) / 60)
	if old != nil {
		if old.Limit() != lim {
			old.SetLimitAt(now, lim)
		}
		if old.Burst() != burst {
			old.SetBurstAt(now, burst)
		}
		return old
	}
	return rate.NewLimiter(lim, burst)
}

// retire takes a key out for good: reloaded with a new secret, or removed.
func (s *svcState) retire(c *keyState) {
	c.gen.Add(1)
	if c.state == StateOpen {
		s.ejected--
		c.state = StateDisabled
	}
	if c.held {
		c.held = false
		s.held--
	}
	if s.prober == c {
		s.prober = nil
	}
	if c.capped.Load() {
		c.capped.Store(false)
		s.capped--
	}
	s.dropAvail(c)
	s.unschedule(c)
}
