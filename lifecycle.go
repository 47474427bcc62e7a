package keypool

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"github.com/keypool/keypool/breaker"
)

// probeInterval spaces the probes of a service whose every key in
// rotation is held.
const probeInterval = time.Second

// updateSlow records whether Release must take the lock for the key: it
// is not plainly active, or it has state a success must clear.
func (s *svcState) updateSlow(c *keyState) {
	c.slow.Store(c.state != StateActive || c.consec429 > 0 || c.strikes > 0 || c.held)
}

// reasonBreakerProbe is the reason of a key back from an ejection, taking
// its one probe request.
const reasonBreakerProbe = "breaker probing"

// wake re-admits keys whose wait is over.
func (s *svcState) wake(now time.Time) {
	for len(s.heap) > 0 && !s.heap[0].wakeAt.After(now) {
		c := s.heap[0]
		s.unschedule(c)
		if c.throttled {
			c.throttled = false
		}
		switch c.state {
		case StateCooling:
			// One probe first, not the herd.
			s.setState(c, StateHalfOpen, time.Time{}, "probing after cooldown", now)
		case StateExhausted:
			s.setState(c, StateHalfOpen, time.Time{}, "probing after quota reset", now)
		case StateOpen:
			if b := c.brk.Load(); b == nil || b.Ready(now) {
				s.setState(c, StateHalfOpen, time.Time{}, reasonBreakerProbe, now)
			} else {
				s.schedule(c, b.OpenUntil())
			}
		default:
			s.admit(c)
		}
	}
}

// nextWake returns when the first waiting key is due, or zero.
func (s *svcState) nextWake(now time.Time) time.Time {
	if len(s.heap) == 0 {
		return time.Time{}
	}
	return s.heap[0].wakeAt
}

// report applies a released lease's outcome.
func (s *svcState) report(c *keyState, o Outcome, now time.Time) {
	p := s.pool
	if o.Cost != 0 {
		c.spent += o.Cost
		if c.key.BalanceTotal > 0 && c.remaining() <= 0 && (c.state == StateActive || c.state == StateHalfOpen) {
			defer s.setState(c, StateExhausted, time.Time{}, "balance spent", now)
		}
	}
	if s.prober == c {
		s.prober = nil
		if o.Kind != OK {
			s.probeAfter = now.Add(probeInterval)
		}
	}
	switch o.Kind {
	case OK:
		c.consec429, c.strikes = 0, 0
		if c.held {
			c.held = false
			s.held--
		}
		b := c.brk.Load()
		closed := b == nil || b.Success() == breaker.Closed
		if closed && c.state == StateHalfOpen {
			s.setState(c, StateActive, time.Time{}, "", now)
		}
	case RateLimited:
		c.consec429++
		d := o.RetryAfter
		if d <= 0 {
			d = p.cfg.Backoff(c.consec429, p.cfg.MaxCooldown)
		} else {
			// Honoured up to the cap, never discarded. Spread keys that
			// were told the same time.
			limit := s.cfg.Load().RetryAfterCap
			if limit <= 0 {
				limit = p.cfg.RetryAfterCap
			}
			if d < limit {
				d += time.Duration(rand.Int64N(int64(d)/10 + int64(50*time.Millisecond)))
			}
			d = min(d, limit)
		}
		reason := o.Reason
		if reason == "" {
			reason = "rate limited"
		}
		until := now.Add(d)
		if c.state == StateCooling && c.until.After(until) {
			// A 429 that raced an earlier one may announce an earlier
			// time (an HTTP-date rounds to the second, a later answer
			// may use another form): a cooldown the upstream announced
			// is never shortened.
			until = c.until
		}
		s.setState(c, StateCooling, until, reason, now)
	case Invalid:
		reason := o.Reason
		if reason == "" {
			reason = "rejected by upstream"
		}
		s.setState(c, StateInvalid, time.Time{}, reason, now)
	case Exhausted:
		var until time.Time
		if o.RetryAfter > 0 {
			until = now.Add(min(o.RetryAfter, p.cfg.MaxQuotaWait))
		}
		reason := o.Reason
		if reason == "" {
			reason = "quota exhausted"
		}
		s.setState(c, StateExhausted, until, reason, now)
	case Failure:
		c.failures++
		b := c.brk.Load()
		if b == nil {
			b, _ = breaker.New(s.bs)
			c.brk.Store(b)
		}
		if b.Failure(now) == breaker.Open && c.state != StateOpen {
			reason := o.Reason
			if reason == "" {
				reason = "upstream failures"
			}
			if s.ejected >= s.maxEject() {
				// Beyond the ejection cap: stay in rotation, held.
				b.Reset()
				if !c.held {
					c.held = true
					s.held++
					s.holds = append(s.holds, Hold{Service: s.name, KeyID: c.key.ID, Kind: HoldEjectionCap,
						Reason: fmt.Sprintf("breaker tripped (%s) with %d of %d keys ejected", reason, s.ejected, s.inRotation()), At: now})
				}
			} else {
				if c.held {
					c.held = false
					s.held--
				}
				s.setState(c, StateOpen, b.OpenUntil(), reason, now)
			}
		}
	case Refused:
		c.strikes++
		need := s.cfg.Load().ConfirmRefusals
		if need <= 0 {
			need = 3
		}
		if c.strikes >= need && (c.state == StateActive || c.state == StateHalfOpen) {
			reason := fmt.Sprintf("%d refusals from distinct requests (%s)", c.strikes, o.Reason)
			if rot, fl := s.inRotation(), s.floor(); rot-1 < fl {
				s.holds = append(s.holds, Hold{Service: s.name, KeyID: c.key.ID, Kind: HoldFloor,
					Reason: fmt.Sprintf("%s; kept: %d keys in rotation, floor %d", reason, rot, fl), At: now})
			} else {
				s.setState(c, StateInvalid, time.Time{}, reason, now)
			}
			c.strikes = 0
		}
	}
	s.updateSlow(c)
	s.checkCap(c)
}

// setState moves a key to st and records an event.
func (s *svcState) setState(c *keyState, st State, until time.Time, reason string, now time.Time) {
	switch st {
	case StateActive:
		if b := c.brk.Load(); b != nil && b.State() != breaker.Closed {
			b.Reset()
		}
		reason, until = "", time.Time{}
	case StateOpen:
		if until.IsZero() {
			until = now.Add(s.bs.OpenTimeout)
		}
	case StateCooling:
		if until.IsZero() {
			until = now.Add(time.Second)
		}
	case StateHalfOpen:
		// Another replica may report the probe period before this one's
		// breaker saw it end: start probing with a fresh breaker.
		if b := c.brk.Load(); b != nil && b.State() == breaker.Open {
			b.Reset()
		}
		until = time.Time{}
	case StateInvalid, StateDisabled:
		until = time.Time{}
	}
	if c.state == st && c.until.Equal(until) && c.reason == reason {
		return
	}
	if c.state == StateOpen {
		s.ejected--
	}
	if st == StateOpen {
		s.ejected++
	}
	if c.held && st != StateActive && st != StateHalfOpen {
		c.held = false
		s.held--
	}
	c.state, c.until, c.reason = st, until, reason
	s.updateSlow(c)
	s.unschedule(c)
	c.throttled = false
	if st == StateActive || st == StateHalfOpen {
		s.admit(c)
		s.checkCap(c)
	} else {
		s.dropAvail(c)
		if !until.IsZero() {
			s.schedule(c, until)
		}
	}
	if s.pool.cfg.OnEvent != nil {
		s.pending = append(s.pending, Event{Service: s.name, KeyID: c.key.ID, State: st, Until: until, Reason: reason, At: now})
	}
}

// inRotation counts the keys that are not invalid, exhausted or disabled.
func (s *svcState) inRotation() int {
	n := 0
	for _, c := range s.all {
		switch c.state {
		case StateInvalid, StateExhausted, StateDisabled:
		default:
			n++
		}
	}
	return n
}

// floor is the number of keys in rotation that confirmed refusals may not
// go below (Service.MinActiveKeys).
func (s *svcState) floor() int {
	if m := s.cfg.Load().MinActiveKeys; m > 0 {
		return m
	}
	n := 0
	for _, c := range s.all {
		if c.state != StateDisabled {
			n++
		}
	}
	return (n + 1) / 2
}

// maxEject is how many keys the breaker may eject at once
// (Service.MaxEjectionPercent of the keys in rotation, at least one).
func (s *svcState) maxEject() int {
	pct := s.cfg.Load().MaxEjectionPercent
	if pct == 0 {
		pct = 50
	}
	if pct >= 100 {
		return math.MaxInt
	}
	return max(1, s.inRotation()*pct/100)
}
