package keypool

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/breaker"
)

// Config configures a Pool. The zero value is ready to use.
type Config struct {
	// Now returns the current time. If nil, time.Now. Tests inject a fake
	// clock here.
	Now func() time.Time
	// Backoff computes 429 cooldowns without a usable Retry-After. If nil,
	// [DefaultBackoff].
	Backoff Backoff
	// MaxCooldown caps the backoff of a 429 without a usable Retry-After,
	// and is the Retry-After of a NoKeyError when no key has a known
	// return time. If zero, 5 minutes.
	MaxCooldown time.Duration
	// RetryAfterCap caps the wait a 429's Retry-After imposes on a key,
	// for services that do not set their own (Service.RetryAfterCap):
	// longer values are clamped to it, never discarded. If zero, 1 hour.
	RetryAfterCap time.Duration
	// MaxQuotaWait caps how long a key stays Exhausted when the upstream
	// named when its quota resets (a daily quota). If zero, 24 hours.
	MaxQuotaWait time.Duration
	// OnHold, if set, is told each time the pool keeps a key in rotation
	// against the evidence: confirmed refusals that would cross the
	// service's MinActiveKeys floor, or a breaker trip beyond its
	// MaxEjectionPercent. Like OnEvent it is called without any pool lock
	// held and must not block for long.
	OnHold func(Hold)
	// Breaker configures per-key circuit breakers. If zero,
	// [breaker.DefaultSettings].
	Breaker breaker.Settings
	// OnEvent, if set, receives every key state change. It is called
	// synchronously, without any pool lock held; it must not block for long.
	OnEvent func(Event)
}

// Backoff returns how long a key cools down after its n-th 429 in a row
// (n ≥ 1) when the upstream gave no usable Retry-After, capped at max.
type Backoff func(n int, max time.Duration) time.Duration

// DefaultBackoff doubles from one second (1 s, 2 s, 4 s, …) up to max, with
// up to 20% random jitter.
func DefaultBackoff(n int, max time.Duration) time.Duration {
	if n < 1 {
		n = 1
	}
	d := max
	if n < 31 {
		d = time.Second << (n - 1)
	}
	if d > max {
		d = max
	}
	return d + time.Duration(rand.Int64N(int64(d)/5+1))
}

// Pool holds services and their keys, picks a key per request and learns
// from each outcome. It is safe for concurrent use.
type Pool struct {
	cfg      Config
	now      func() time.Time
	services atomic.Pointer[map[string]*svcState]
	mu       sync.Mutex // serialises SetService and RemoveService
}

// New returns an empty pool.
func New(cfg Config) (*Pool, error) {
	if cfg.Breaker == (breaker.Settings{}) {
		cfg.Breaker = breaker.DefaultSettings()
	}
	if err := cfg.Breaker.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if cfg.MaxCooldown <= 0 {
		cfg.MaxCooldown = 5 * time.Minute
	}
	if cfg.RetryAfterCap <= 0 {
		cfg.RetryAfterCap = time.Hour
	}
	if cfg.MaxQuotaWait <= 0 {
		cfg.MaxQuotaWait = 24 * time.Hour
	}
	if cfg.Backoff == nil {
		cfg.Backoff = DefaultBackoff
	}
	p := &Pool{cfg: cfg, now: cfg.Now}
	if p.now == nil {
		p.now = time.Now
	}
	m := map[string]*svcState{}
	p.services.Store(&m)
	return p, nil
}

// Now returns the pool's current time.
func (p *Pool) Now() time.Time { return p.now() }

// SetService adds or replaces a service and its keys. Keys that keep their
// ID and Secret keep their live state (cooldowns, breakers, counters,
// in-flight requests); their other settings are updated in place. Keys that
// are gone are never picked again; leases already taken on them finish
// normally and their reports are ignored.
func (p *Pool) SetService(svc Service, keys []Key) error {
	if svc.Name == "" {
		return fmt.Errorf("%w: service name is empty", ErrInvalidConfig)
	}
	if svc.Auth == nil {
		svc.Auth = Bearer
	}
	if svc.Selector == nil {
		svc.Selector = &RoundRobin{}
	}
	switch {
	case svc.RetryAfterCap < 0:
		return fmt.Errorf("%w: service %q: retry-after cap must not be negative", ErrInvalidConfig, svc.Name)
	case svc.ConfirmRefusals < 0:
		return fmt.Errorf("%w: service %q: confirm refusals must not be negative", ErrInvalidConfig, svc.Name)
	case svc.MinActiveKeys < 0:
		return fmt.Errorf("%w: service %q: min active keys must not be negative", ErrInvalidConfig, svc.Name)
	case svc.MaxEjectionPercent < 0 || svc.MaxEjectionPercent > 100:
		return fmt.Errorf("%w: service %q: max ejection percent must be 0 to 100", ErrInvalidConfig, svc.Name)
	}
	bs := p.cfg.Breaker
	if svc.Breaker != nil {
		bs = *svc.Breaker
		if err := bs.Validate(); err != nil {
			return fmt.Errorf("%w: service %q: %w", ErrInvalidConfig, svc.Name, err)
		}
	}
	seen := make(map[string]bool, len(keys))
	for i := range keys {
		k := &keys[i]
		if k.ID == "" {
			return fmt.Errorf("%w: service %q: key %d has no id", ErrInvalidConfig, svc.Name, i)
		}
		if seen[k.ID] {
			return fmt.Errorf("%w: service %q: duplicate key id %q", ErrInvalidConfig, svc.Name, k.ID)
		}
		seen[k.ID] = true
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	old := *p.services.Load()
	s := old[svc.Name]
	fresh := s == nil
	if fresh {
		s = &svcState{pool: p, name: svc.Name, keys: map[string]*keyState{}}
	}
	events := s.load(svc, bs, keys, p.now())
	if fresh {
		m := make(map[string]*svcState, len(old)+1)
		for k, v := range old {
			m[k] = v
		}
		m[svc.Name] = s
		p.services.Store(&m)
	}
	p.emit(events)
	return nil
}

// RemoveService removes a service; its keys are never picked again.
func (p *Pool) RemoveService(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := *p.services.Load()
	s, ok := old[name]
	if !ok {
		return
	}
	m := make(map[string]*svcState, len(old))
	for k, v := range old {
		if k != name {
			m[k] = v
		}
	}
	p.services.Store(&m)
	s.mu.Lock()
	for _, c := range s.all {
		c.gen.Add(1)
	}
	s.all, s.avail, s.keys, s.heap = nil, nil, map[string]*keyState{}, nil
	s.ejected, s.held, s.prober = 0, 0, nil
	s.mu.Unlock()
}

// Service returns a service's settings.
func (p *Pool) Service(name string) (Service, bool) {
	s, ok := (*p.services.Load())[name]
	if !ok {
		return Service{}, false
	}
	svc := *s.cfg.Load()
	svc.Headers = maps.Clone(svc.Headers)
	return svc, true
}

// Services returns the names of every service, sorted.
func (p *Pool) Services() []string {
	m := *p.services.Load()
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ServicesWithFeature returns the names of the services that have a key
// serving feature (labels["feature"] or an entry in Key.Features), sorted:
// a feature that only one service serves identifies its pool.
func (p *Pool) ServicesWithFeature(feature string) []string {
	var names []string
	for _, name := range p.Services() {
		s := (*p.services.Load())[name]
		if s == nil {
			continue
		}
		s.mu.Lock()
		for _, c := range s.all {
			_, ok := c.key.Features[feature]
			if ok || c.key.Labels["feature"] == feature {
				names = append(names, name)
				break
			}
		}
		s.mu.Unlock()
	}
	return names
}

// Acquire picks a key of the service for one request. The returned lease
// must be released exactly once with the outcome. When no key can serve it
// returns a *[NoKeyError]; for an unknown service, [ErrUnknownService].
func (p *Pool) Acquire(service string, r Request) (Lease, error) {
	s := (*p.services.Load())[service]
	if s == nil {
		return Lease{}, fmt.Errorf("%w: %q", ErrUnknownService, service)
	}
	now := p.now()
	s.mu.Lock()
	c := s.pick(r, now)
	var l Lease
	if c != nil {
		l = s.take(c, now)
	}
	events := s.takeEvents()
	var wait time.Time
	var reason string
	unavail := false
	if c == nil {
		reason = s.describe()
		wait = s.nextWake(now)
		unavail = s.unavailable()
		if s.outage {
			// A probe is testing the upstream: come back soon.
			wait = now.Add(time.Second)
			reason += "; upstream failing, probing"
		}
		if s.capped > 0 && (wait.IsZero() || wait.After(now.Add(time.Second))) {
			// A key at its in-flight cap is back as soon as a request ends.
			wait = now.Add(time.Second)
		}
	}
	s.mu.Unlock()
	p.emit(events)
	if c == nil {
		err := p.noKey(service, now, wait, reason)
		if unavail {
			nk := err.(*NoKeyError)
			return Lease{}, &UnavailableError{Service: service, RetryAfter: nk.RetryAfter, Reason: reason}
		}
		return Lease{}, err
	}
	return l, nil
}

// Available reports whether a key of the service could be picked now: one
// is in rotation and not cooling, spent, open, held or at a limit. It is
// false for an unknown service. A caller that routes between services
// uses it to skip one before spending a request on it; the answer may be
// stale by the time it acts (Acquire still decides).
func (p *Pool) Available(service string) bool {
	s := (*p.services.Load())[service]
	if s == nil {
		return false
	}
	now := p.now()
	s.mu.Lock()
	s.wake(now)
	ok := len(s.avail) > 0 && !(s.held > 0 && s.allHeld() && (s.prober != nil || now.Before(s.probeAfter)))
	events := s.takeEvents()
	s.mu.Unlock()
	p.emit(events)
	return ok
}

func (p *Pool) noKey(service string, now, until time.Time, reason string) error {
	if until.IsZero() {
		until = now.Add(p.cfg.MaxCooldown)
	}
	d := until.Sub(now)
	if d < time.Second {
		d = time.Second
		until = now.Add(d)
	}
	return &NoKeyError{Service: service, RetryAfter: d, Until: until, Reason: reason}
}

func (p *Pool) emitHolds(holds []Hold) {
	if p.cfg.OnHold == nil {
		return
	}
	for _, h := range holds {
		p.cfg.OnHold(h)
	}
}

func (p *Pool) emit(events []Event) {
	if p.cfg.OnEvent == nil {
		return
	}
	for _, e := range events {
		p.cfg.OnEvent(e)
	}
}

// Apply sets a key's state as an event learned elsewhere says (another
// replica's): it is how replicas share what each learned.
// It emits the resulting change to [Config.OnEvent] with Event.Remote
// set, so a listener that shares or persists events skips it and no
// event echoes back to where it came from. It reports whether the key
// exists; unknown services and keys are ignored.
func (p *Pool) Apply(e Event) bool {
	return p.onKey(e.Service, e.KeyID, true, func(s *svcState, c *keyState, now time.Time) {
		s.setState(c, e.State, e.Until, e.Reason, now)
	})
}

// SetKeyState moves a key to a state by a decision taken here, as an
// admin's: StateActive puts an invalid, exhausted or disabled key back in
// rotation and closes its breaker. Unlike [Pool.Apply] its event is not
// Remote, so listeners share and persist it as they do what the pool
// learns. It reports whether the key exists.
func (p *Pool) SetKeyState(service, keyID string, st State, until time.Time, reason string) bool {
	return p.onKey(service, keyID, false, func(s *svcState, c *keyState, now time.Time) {
		s.setState(c, st, until, reason, now)
	})
}

// Spend deducts amount from a key's balance, in its BalanceUnit, for spend
// learned after its lease was released (metered usage at the end of a
// stream). A key whose balance runs out becomes Exhausted. It is
// [Pool.Report] of an outcome that carries only the cost. It reports
// whether the key exists.
func (p *Pool) Spend(service, keyID string, amount float64) bool {
	return p.Report(service, keyID, Outcome{Kind: ClientError, Cost: amount})
}

// Report applies an outcome to a key as if a lease on it had been
// released with it: a 429 cools it down (with the same backoff), a failure
// counts toward its breaker, and so on. It serves callers that used a key
// without holding its lease (a leased raw key reported after its lease
// expired, a refusal confirmed after another key served). It reports
// whether the key exists.
func (p *Pool) Report(service, keyID string, o Outcome) bool {
	return p.onKey(service, keyID, false, func(s *svcState, c *keyState, now time.Time) {
		s.report(c, o, now)
	})
}

// onKey runs f on a key under its service's lock, then delivers the
// events and holds f produced, marked Remote when remote. It reports
// whether the key exists.
func (p *Pool) onKey(service, keyID string, remote bool, f func(s *svcState, c *keyState, now time.Time)) bool {
	s := (*p.services.Load())[service]
	if s == nil {
		return false
	}
	now := p.now()
	s.mu.Lock()
	c := s.keys[keyID]
	if c != nil {
		f(s, c, now)
	}
	events, holds := s.takeEvents(), s.takeHolds()
	s.mu.Unlock()
	for i := range events {
		events[i].Remote = remote
	}
	p.emit(events)
	p.emitHolds(holds)
	return c != nil
}
