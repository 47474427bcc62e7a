package keypool

import "time"

// Lease is one key taken for one request. Release it exactly once; a
// second Release of the same value is a no-op. A Lease is small and
// returned by value; copies share nothing, so release the one you hold.
type Lease struct {
	c        *keyState
	key      *Key
	gen      uint64
	start    time.Time
	released bool
}

// KeyID returns the key's id.
func (l *Lease) KeyID() string { return l.key.ID }

// Secret returns the key's credential.
func (l *Lease) Secret() Secret { return l.key.Secret }

// Key returns the key's settings. Do not modify it.
func (l *Lease) Key() *Key { return l.key }

// Release reports the outcome of the request and returns the key. A report
// for a key that was reloaded with a new secret or removed since the lease
// was taken is ignored.
func (l *Lease) Release(o Outcome) {
	if l.c == nil || l.released {
		return
	}
	l.released = true
	c, s := l.c, l.c.svc
	c.inFlight.Add(-1)
	if c.gen.Load() != l.gen {
		return
	}
	p := s.pool
	now := p.now()
	if o.Kind == OK || o.Kind == ClientError {
		c.observeLatency(now.Sub(l.start))
	}
	if o.Kind != OK || o.Cost != 0 || c.capped.Load() || c.slow.Load() {
		s.mu.Lock()
		if c.gen.Load() == l.gen {
			s.report(c, o, now)
		}
		events, holds := s.takeEvents(), s.takeHolds()
		s.mu.Unlock()
		p.emit(events)
		p.emitHolds(holds)
		return
	}
	if b := c.brk.Load(); b != nil {
		b.Success()
	}
}

// take leases c for one request at now; the caller holds the lock.
func (s *svcState) take(c *keyState, now time.Time) Lease {
	c.inFlight.Add(1)
	c.countRequest(now)
	s.checkCap(c)
	return Lease{c: c, key: c.key, gen: c.gen.Load(), start: now}
}
