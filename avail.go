package keypool

import (
	"fmt"
	"strings"
	"time"

	"golang.org/x/time/rate"
)

// pick chooses a key for r at now, or nil.
func (s *svcState) pick(r Request, now time.Time) *keyState {
	s.wake(now)
	s.outage = false
	if s.held > 0 && s.allHeld() {
		// Every key in rotation tripped beyond the ejection cap: one probe
		// at a time, at most one a second, tests the upstream; the rest
		// are told to come back.
		if s.prober != nil || now.Before(s.probeAfter) {
			s.outage = true
			return nil
		}
		c := s.pickAny(r, now)
		s.prober = c
		return c
	}
	return s.pickAny(r, now)
}

// pickAny chooses among the available keys that fit r.
func (s *svcState) pickAny(r Request, now time.Time) *keyState {
	s.cands.affinity, s.cands.now = r.Affinity, now
	for range 3 {
		if len(s.avail) == 0 {
			return nil
		}
		s.cands.list = s.avail
		c := s.offered(s.cfg.Load().Selector.Select(&s.cands))
		if c == nil || !s.fits(c, r) {
			break
		}
		if s.consume(c, r, now) {
			return c
		}
	}
	// Slow path: the selector's choice was excluded, filtered out or over
	// its rate. Offer it only the keys that fit.
	for range 3 {
		s.fit = s.fit[:0]
		for _, c := range s.avail {
			if s.fits(c, r) && s.hasToken(c, r, now) {
				s.fit = append(s.fit, c)
			}
		}
		if len(s.fit) == 0 {
			return nil
		}
		s.cands.list = s.fit
		c := s.offered(s.cfg.Load().Selector.Select(&s.cands))
		if c == nil || !s.fits(c, r) {
			c = s.fit[0]
		}
		if s.consume(c, r, now) {
			return c
		}
	}
	return nil
}

// offered returns the key behind a selector's choice, or nil when the
// selector chose nothing or a key that is not in this service's rotation.
func (s *svcState) offered(c *Candidate) *keyState {
	if c == nil || c.k == nil || c.k.svc != s || c.k.availIdx < 0 {
		return nil
	}
	return c.k
}

// allHeld reports whether every key in rotation is held.
func (s *svcState) allHeld() bool {
	for _, c := range s.avail {
		if !c.held {
			return false
		}
	}
	return len(s.avail) > 0
}

func (s *svcState) fits(c *keyState, r Request) bool {
	for _, id := range r.Exclude {
		if id == c.key.ID {
			return false
		}
	}
	if r.Feature != "" {
		if c.key.Labels["feature"] != r.Feature {
			if _, ok := c.key.Features[r.Feature]; !ok {
				return false
			}
		}
	}
	return true
}

func (s *svcState) hasToken(c *keyState, r Request, now time.Time) bool {
	if c.limiter != nil && c.limiter.TokensAt(now) < 1 {
		return false
	}
	if r.Feature != "" {
		if l := s.featureLimiter(c, r.Feature); l != nil && l.TokensAt(now) < 1 {
			return false
		}
	}
	return true
}

// consume takes a request's worth of the key's rate, or throttles the key
// until it has one.
func (s *svcState) consume(c *keyState, r Request, now time.Time) bool {
	var fl *rate.Limiter
	if r.Feature != "" {
		if fl = s.featureLimiter(c, r.Feature); fl != nil && fl.TokensAt(now) < 1 {
			return false
		}
	}
	if c.limiter != nil && !c.limiter.AllowN(now, 1) {
		// Out of rotation until the next token.
		deficit := 1 - c.limiter.TokensAt(now)
		wait := time.Duration(deficit / float64(c.limiter.Limit()) * float64(time.Second))
		c.throttled = true
		s.dropAvail(c)
		s.schedule(c, now.Add(wait))
		return false
	}
	if fl != nil {
		fl.AllowN(now, 1)
	}
	return true
}

func (s *svcState) featureLimiter(c *keyState, f string) *rate.Limiter {
	rpm := c.key.Features[f]
	if rpm <= 0 {
		return nil
	}
	if l := c.featLim[f]; l != nil {
		return l
	}
	if c.featLim == nil {
		c.featLim = map[string]*rate.Limiter{}
	}
	l := rate.NewLimiter(rate.Limit(float64(rpm)/60), rateBurst(rpm, s.cfg.Load().RateBurst))
	c.featLim[f] = l
	return l
}

// rateBurst is the bucket size for rpm: the configured burst (at most
// rpm) or, when zero, the full rpm.
func rateBurst(rpm, burst int) int {
	if burst <= 0 || burst > rpm {
		return rpm
	}
	return burst
}

func (s *svcState) admit(c *keyState) {
	if c.availIdx >= 0 || c.throttled || c.capped.Load() {
		return
	}
	if c.state != StateActive && c.state != StateHalfOpen {
		return
	}
	c.availIdx = len(s.avail)
	s.avail = append(s.avail, c)
}

func (s *svcState) dropAvail(c *keyState) {
	i := c.availIdx
	if i < 0 {
		return
	}
	last := len(s.avail) - 1
	s.avail[i] = s.avail[last]
	s.avail[i].availIdx = i
	s.avail[last] = nil
	s.avail = s.avail[:last]
	c.availIdx = -1
}

// checkCap takes a key out of rotation while its in-flight count is at the
// cap (the breaker's probe count while half-open) and puts it back below.
func (s *svcState) checkCap(c *keyState) {
	limit := c.maxIn
	if c.state == StateHalfOpen {
		probes := int64(s.bs.HalfOpenMaxRequests)
		if limit == 0 || probes < limit {
			limit = probes
		}
	}
	if limit > 0 && c.inFlight.Load() >= limit {
		if !c.capped.Load() {
			c.capped.Store(true)
			s.capped++
			s.dropAvail(c)
		}
		return
	}
	if c.capped.Load() {
		c.capped.Store(false)
		s.capped--
		s.admit(c)
	}
}

// unavailable reports whether no key can serve because the upstream is
// failing: a probe is out while every key in rotation is held, or every
// key that could serve is ejected by its breaker or back from an ejection
// with its one probe out (none is cooling, spent until a known time, at
// a limit or merely excluded).
func (s *svcState) unavailable() bool {
	if s.outage {
		return true
	}
	if s.ejected == 0 && s.capped == 0 {
		return false
	}
	failing := s.ejected > 0
	for _, c := range s.all {
		if c.throttled {
			return false
		}
		switch c.state {
		case StateHalfOpen:
			if !c.capped.Load() || c.reason != reasonBreakerProbe {
				return false
			}
			failing = true // its probe after an ejection is out
		case StateCooling, StateActive:
			return false
		case StateExhausted:
			if !c.until.IsZero() {
				return false
			}
		}
	}
	return failing
}

// describe summarises why no key is available, for the error a person
// reads; it counts states only in small pools, to stay cheap.
func (s *svcState) describe() string {
	n := len(s.all)
	switch {
	case n == 0:
		return "the service has no keys"
	case n > 256:
		return fmt.Sprintf("%d keys, none available", n)
	}
	var byState [len(stateNames)]int
	for _, c := range s.all {
		byState[c.state]++
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d keys:", n)
	sep := " "
	if s.capped > 0 {
		fmt.Fprintf(&b, " %d at their in-flight limit", s.capped)
		sep = ", "
	}
	for st, k := range byState {
		if k > 0 && State(st) != StateActive {
			fmt.Fprintf(&b, "%s%d %s", sep, k, State(st))
			sep = ", "
		}
	}
	if sep == " " {
		b.WriteString(" all at their rate limits or excluded")
	}
	return b.String()
}
