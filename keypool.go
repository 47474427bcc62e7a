package keypool

import (
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/keypool/keypool/breaker"
)

// State is where a key stands in its life.
type State uint8

// Key states. Active and HalfOpen keys are in rotation; the others wait for
// a time (Cooling, Open, Exhausted with a reset time) or for an admin or a
// re-sync (Invalid, Exhausted without a reset time, Disabled).
const (
	StateActive    State = iota // in rotation
	StateCooling                // rate-limited by the upstream until a time
	StateOpen                   // circuit breaker open after upstream faults
	StateHalfOpen               // probing after a cooldown, quota reset or breaker: one request at a time
	StateInvalid                // revoked: 401, an invalid-key code, or confirmed refusals
	StateExhausted              // quota or balance spent (402, insufficient_quota)
	StateDisabled               // taken out of rotation by an admin
)

var stateNames = [...]string{"active", "cooling", "open", "half_open", "invalid", "exhausted", "disabled"}

// String returns the state's name as the admin API shows it.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", s)
}

// MarshalText encodes the state's name.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText decodes a state's name.
func (s *State) UnmarshalText(b []byte) error {
	v, err := ParseState(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// ParseState returns the state named name.
func ParseState(name string) (State, error) {
	return parseName[State](stateNames[:], name, "key state")
}

// parseName returns the index of name in names as a T.
func parseName[T ~uint8](names []string, name, what string) (T, error) {
	for i, n := range names {
		if n == name {
			return T(i), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown %s %q (want one of %s)", ErrInvalidConfig, what, name, strings.Join(names, ", "))
}

// Key is one upstream credential and its static settings. A Pool keeps its
// own copy; change a key by calling [Pool.SetService] again.
type Key struct {
	// ID identifies the key; it is shown in listings, metrics and the
	// X-Keypool-Key-Id header. Required and unique within the service.
	ID string
	// Secret is the credential.
	Secret Secret
	// Weight is the key's share for the weighted selector. If zero, 1.
	Weight int
	// Priority orders keys for the ordered selector: lower first.
	Priority int
	// RateLimitRPM is how many requests per minute the upstream allows this
	// key. If zero, the service's; negative means unlimited.
	RateLimitRPM int
	// MaxInFlight caps concurrent requests on the key. If zero, the
	// service's; zero there means unlimited.
	MaxInFlight int
	// Labels are free-form; labels["feature"] names a feature the key
	// serves (see [Request.Feature]).
	Labels map[string]string
	// Features maps a feature the key serves to its requests per minute
	// for that feature (zero: no per-feature limit).
	Features map[string]int
	// BalanceTotal, BalanceUsed and BalanceUnit describe the key's quota or
	// prepaid balance; BalanceTotal zero means unknown or unlimited.
	BalanceTotal float64
	BalanceUsed  float64
	BalanceUnit  string
	// State is the state the key's owner recorded (Active, Invalid,
	// Exhausted or Disabled). The pool applies it when it changes between
	// two loads, so a re-sync or an admin can put a key back in rotation;
	// an unchanged value leaves the live state the pool learned alone.
	State State
	// Reason says why State is not Active.
	Reason string
}

// Service is an upstream API and the policy for its keys.
type Service struct {
	// Name identifies the service (the {service} in /v1/{service}/...).
	Name string
	// BaseURL is the upstream's base, e.g. https://api.openai.com.
	BaseURL string
	// Auth injects a key into a request. If nil, [Bearer].
	Auth AuthScheme
	// RateLimitRPM is the default per-key requests per minute (zero:
	// unlimited).
	RateLimitRPM int
	// RateBurst is how many requests a rested key (or a key's feature)
	// may send at once. If zero, its full RPM: a rested key admits RPM
	// requests at once, then RPM/60 a second as the bucket refills. A
	// smaller burst smooths the traffic for upstreams that punish bursts
	// (e.g. RPM/10: no more than 1.1 times the RPM in any minute, at most
	// a tenth of it at once).
	RateBurst int
	// MaxInFlight is the default per-key cap on concurrent requests (zero:
	// unlimited).
	MaxInFlight int
	// Selector picks among available keys. If nil, [RoundRobin].
	Selector Selector
	// Headers are added to every upstream request (proxy_headers).
	Headers map[string]string
	// Breaker overrides the pool's breaker settings for this service.
	Breaker *breaker.Settings
	// RetryAfterCap caps the wait a 429's Retry-After can impose on a key:
	// longer waits are clamped to it, never discarded. If zero, the
	// pool's [Config.RetryAfterCap] (1 hour).
	RetryAfterCap time.Duration
	// ConfirmRefusals is how many ambiguous refusals ([Refused]: a bare
	// 403 that another key then served), each from a distinct request and
	// with no success of the key in between, confirm that a key is
	// invalid. If zero, 3.
	ConfirmRefusals int
	// MinActiveKeys is the floor of keys in rotation (not invalid,
	// exhausted or disabled) that confirmed ambiguous refusals may not
	// cross: a key that would take the service below it stays in rotation
	// and [Config.OnHold] is told. If zero, half of the service's keys
	// that are not disabled, rounded up.
	MinActiveKeys int
	// MaxEjectionPercent is the largest share of the service's keys in
	// rotation that the breaker may eject (StateOpen) at once, as in
	// Envoy's outlier detection; at least one key may always be ejected.
	// A key that trips beyond it stays in rotation ("held"); when every
	// key in rotation is held, the service is unavailable: Acquire admits
	// one probe request at a time (at most one a second) and answers the
	// others with an *[UnavailableError]. If zero, 50; 100 disables the
	// cap.
	MaxEjectionPercent int
	// HeaderTimeout bounds how long one attempt waits for the upstream's
	// response headers before it counts as a Failure of its key and the
	// next key is tried; IdleTimeout bounds the wait for each read of a
	// response body (the time between stream events); Timeout bounds a
	// whole request, failover and body included. Zero means the
	// proxy's own setting (see proxy.Transport and proxy.Handler).
	HeaderTimeout time.Duration
	IdleTimeout   time.Duration
	Timeout       time.Duration
}

// OutcomeKind classifies what happened to a request made with a key.
type OutcomeKind uint8

// Outcome kinds. Only RateLimited, Invalid, Exhausted, Failure and Refused
// change a key's state; ClientError and Canceled say nothing about the key.
const (
	OK          OutcomeKind = iota // the upstream served the request
	RateLimited                    // 429: cool down until RetryAfter
	Invalid                        // 401 or an invalid-key code: the key is revoked
	Exhausted                      // 402, insufficient_quota: quota or balance spent
	Failure                        // 5xx, timeout, reset: counts toward the breaker
	ClientError                    // a 4xx caused by the request itself
	Canceled                       // the client went away
	// Refused is an ambiguous refusal: a bare 403 (no invalid-key code)
	// that may be about the request rather than the key. As a lease's
	// outcome it is one strike against the key; Service.ConfirmRefusals
	// strikes from distinct requests, with no success in between, make
	// the key Invalid unless that would cross Service.MinActiveKeys.
	// [proxy.Transport] reports it only when another key then served the
	// same request.
	Refused
)

var outcomeNames = [...]string{"ok", "rate_limited", "invalid", "exhausted", "error", "client_error", "canceled", "refused"}

// String returns the outcome's name as used by the lease report API.
func (k OutcomeKind) String() string {
	if int(k) < len(outcomeNames) {
		return outcomeNames[k]
	}
	return fmt.Sprintf("outcome(%d)", k)
}

// ParseOutcomeKind returns the kind named name ("ok", "rate_limited",
// "invalid", "exhausted", "error", "client_error", "canceled",
// "refused").
func ParseOutcomeKind(name string) (OutcomeKind, error) {
	return parseName[OutcomeKind](outcomeNames[:], name, "outcome")
}

// Outcome is what a lease reports when it is released.
type Outcome struct {
	Kind OutcomeKind
	// RetryAfter is when a RateLimited or Exhausted key may be tried again,
	// as the upstream said; zero or out of range means "use the backoff"
	// (RateLimited) or "until an admin or re-sync" (Exhausted).
	RetryAfter time.Duration
	// Cost is spend to deduct from the key's balance, in its BalanceUnit.
	Cost float64
	// Reason is a short human explanation (an HTTP status, an error code).
	Reason string
}

// Event is a change in a key's state. Events are delivered to
// [Config.OnEvent] and can be applied to another pool with [Pool.Apply], so
// that replicas can share what each learned.
type Event struct {
	Service string    `json:"service"`
	KeyID   string    `json:"key_id"`
	State   State     `json:"state"`
	Until   time.Time `json:"until,omitzero"`
	Reason  string    `json:"reason,omitempty"`
	At      time.Time `json:"at"`
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

// Hold is a key the pool kept in rotation although the evidence would
// have taken it out; see [Config.OnHold].
type Hold struct {
	Service string `json:"service"`
	KeyID   string `json:"key_id"`
	// Kind is HoldFloor or HoldEjectionCap.
	Kind   string    `json:"kind"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// Hold kinds.
const (
	// HoldFloor: confirmed refusals would have made the key invalid and
	// taken the service below its MinActiveKeys.
	HoldFloor = "floor"
	// HoldEjectionCap: the key's breaker tripped while the service's
	// MaxEjectionPercent of keys were already ejected.
	HoldEjectionCap = "ejection_cap"
)

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
		s = &svcState{pool: p, name: svc.Name, keys: map[string]*Candidate{}}
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
	s.all, s.avail, s.keys, s.heap = nil, nil, map[string]*Candidate{}, nil
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

// Request narrows which key [Pool.Acquire] may pick.
type Request struct {
	// Affinity keeps requests with the same value on the same key while it
	// is healthy, with the sticky selector (a user, a session, a prompt
	// cache key).
	Affinity string
	// Feature restricts the pick to keys serving that feature (labels
	// ["feature"] or an entry in Key.Features), each within its
	// per-feature rate.
	Feature string
	// Exclude lists key IDs not to pick, such as keys a retry already
	// tried.
	Exclude []string
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

// unavailable reports whether no key can serve because the upstream is
// failing: a probe is out while every key in rotation is held, or every
// key that could serve is ejected by its breaker (none is cooling, spent
// until a known time, at a limit or merely excluded).
func (s *svcState) unavailable() bool {
	if s.outage {
		return true
	}
	if s.ejected == 0 || s.capped > 0 {
		return false
	}
	for _, c := range s.all {
		if c.throttled {
			return false
		}
		switch c.state {
		case StateCooling, StateActive, StateHalfOpen:
			return false
		case StateExhausted:
			if !c.until.IsZero() {
				return false
			}
		}
	}
	return true
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

// Apply sets a key's state from an event produced elsewhere (another
// replica, an admin action, a lease report). It does not call OnEvent.
// Unknown services and keys are ignored.
func (p *Pool) Apply(e Event) {
	s := (*p.services.Load())[e.Service]
	if s == nil {
		return
	}
	now := p.now()
	s.mu.Lock()
	if c := s.keys[e.KeyID]; c != nil {
		s.setState(c, e.State, e.Until, e.Reason, now)
	}
	s.pending = s.pending[:0]
	s.mu.Unlock()
}

// SetKeyState moves a key to a state, as an admin would: StateActive puts an
// invalid, exhausted or disabled key back in rotation and closes its
// breaker. It emits an event. It reports whether the key exists.
func (p *Pool) SetKeyState(service, keyID string, st State, until time.Time, reason string) bool {
	s := (*p.services.Load())[service]
	if s == nil {
		return false
	}
	now := p.now()
	s.mu.Lock()
	c := s.keys[keyID]
	if c != nil {
		s.setState(c, st, until, reason, now)
	}
	events := s.takeEvents()
	s.mu.Unlock()
	p.emit(events)
	return c != nil
}

// Spend deducts amount from a key's balance, in its BalanceUnit, for spend
// learned after its lease was released (metered usage at the end of a
// stream). A key whose balance runs out becomes Exhausted. It reports
// whether the key exists.
func (p *Pool) Spend(service, keyID string, amount float64) bool {
	return p.Report(service, keyID, Outcome{Kind: ClientError, Cost: amount})
}

// Report applies an outcome to a key as if a lease on it had been
// released with it: a 429 cools it down (with the same backoff), a failure
// counts toward its breaker, and so on. It serves callers that used a key
// without holding its lease (a leased raw key reported after its lease
// expired). It reports whether the key exists.
func (p *Pool) Report(service, keyID string, o Outcome) bool {
	s := (*p.services.Load())[service]
	if s == nil {
		return false
	}
	now := p.now()
	s.mu.Lock()
	c := s.keys[keyID]
	if c != nil {
		s.report(c, o, now)
	}
	events, holds := s.takeEvents(), s.takeHolds()
	s.mu.Unlock()
	p.emit(events)
	p.emitHolds(holds)
	return c != nil
}

// Lease is one key taken for one request. Release it exactly once; a
// second Release of the same value is a no-op. A Lease is small and
// returned by value; copies share nothing, so release the one you hold.
type Lease struct {
	c        *Candidate
	key      *Key
	gen      uint64
	start    time.Time
	released bool
}

// Valid reports whether the lease holds a key.
func (l *Lease) Valid() bool { return l.c != nil }

// KeyID returns the key's id.
func (l *Lease) KeyID() string { return l.key.ID }

// Secret returns the key's credential.
func (l *Lease) Secret() Secret { return l.key.Secret }

// Key returns the key's settings. Do not modify it.
func (l *Lease) Key() *Key { return l.key }

// Service returns the service's current settings. Do not modify them.
func (l *Lease) Service() *Service { return l.c.svc.cfg.Load() }

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

// KeyStats is a snapshot of one key's live state.
type KeyStats struct {
	ID      string `json:"id"`
	Service string `json:"service"`
	Hint    string `json:"hint"`
	State   State  `json:"state"`
	Reason  string `json:"reason,omitempty"`
	// Until is when a Cooling, Open or Exhausted key is expected back.
	Until              time.Time     `json:"cooldown_until,omitzero"`
	InFlight           int64         `json:"in_flight"`
	RequestsLastMinute int           `json:"requests_last_minute"`
	Requests           uint64        `json:"requests"`
	Failures           uint64        `json:"failures"`
	Latency            time.Duration `json:"latency_ewma_ns"`
	Breaker            string        `json:"breaker"`
	// Remaining is BalanceTotal less what is used; -1 when unknown.
	Remaining float64 `json:"remaining"`
	Spent     float64 `json:"spent"`
	// Refusals counts the ambiguous refusals ([Refused]) since the key's
	// last success, toward Service.ConfirmRefusals.
	Refusals int `json:"refusals,omitempty"`
	// Held reports whether the key's breaker tripped beyond the service's
	// ejection cap and the key was kept in rotation.
	Held bool `json:"held,omitempty"`
	// Features is the use of each rate-limited feature of the key
	// ([Key.Features]); nil when it has none.
	Features map[string]FeatureUse `json:"features,omitempty"`
}

// FeatureUse is one feature's requests-per-minute budget on a key. The
// budget is a bucket of RPM leases (or Service.RateBurst) refilled at RPM
// a minute: Used is the leases the bucket is short of full, which is the
// leases of the trailing minute when they came in one burst, and fewer as
// the bucket refills; Available is what may be leased now.
type FeatureUse struct {
	RPM       int `json:"rpm"`
	Used      int `json:"used"`
	Available int `json:"available"`
}

// Stats returns a snapshot of every key of a service, in load order.
func (p *Pool) Stats(service string) ([]KeyStats, bool) {
	s := (*p.services.Load())[service]
	if s == nil {
		return nil, false
	}
	now := p.now()
	s.mu.Lock()
	s.wake(now)
	out := make([]KeyStats, 0, len(s.all))
	for _, c := range s.all {
		st := KeyStats{
			ID: c.key.ID, Service: s.name, Hint: c.key.Secret.Hint(),
			State: c.state, Reason: c.reason, Until: c.until,
			InFlight: c.inFlight.Load(), RequestsLastMinute: c.lastMinute(now),
			Requests: c.requests, Failures: c.failures,
			Latency: time.Duration(c.ewma.Load()), Breaker: "closed",
			Remaining: c.Remaining(), Spent: c.spent,
			Refusals: c.strikes, Held: c.held,
		}
		if math.IsInf(st.Remaining, 1) {
			st.Remaining = -1
		}
		st.Features = featureUse(c, s.cfg.Load().RateBurst, now)
		if b := c.brk.Load(); b != nil {
			st.Breaker = b.State().String()
		}
		out = append(out, st)
	}
	events := s.takeEvents()
	s.mu.Unlock()
	p.emit(events)
	return out, true
}

// Candidate is a key's live state as a [Selector] sees it. Its methods are
// safe to call from Select (which runs under the service's lock).
type Candidate struct {
	svc      *svcState
	gen      atomic.Uint64
	inFlight atomic.Int64
	ewma     atomic.Int64 // latency EWMA in nanoseconds
	capped   atomic.Bool  // out of rotation because in-flight is at the cap
	slow     atomic.Bool  // state is not Active: Release must take the lock
	brk      atomic.Pointer[breaker.Breaker]
	idHash   uint64

	// The fields below are protected by svc.mu.
	key        *Key
	storedSt   State
	state      State
	reason     string
	until      time.Time
	limiter    *rate.Limiter
	featLim    map[string]*rate.Limiter
	maxIn      int64
	availIdx   int
	heapIdx    int
	wakeAt     time.Time
	throttled  bool
	consec429  int
	strikes    int  // ambiguous refusals since the last success
	held       bool // tripped beyond the ejection cap, kept in rotation
	spent      float64
	requests   uint64
	failures   uint64
	swrr       int64 // smooth weighted round robin's current weight
	buckets    [12]uint32
	bucketBase int64 // index of buckets[0]'s 5-second slot
}

// ID returns the key's id.
func (c *Candidate) ID() string { return c.key.ID }

// Key returns the key's settings. Do not modify it.
func (c *Candidate) Key() *Key { return c.key }

// InFlight returns how many requests are using the key now.
func (c *Candidate) InFlight() int64 { return c.inFlight.Load() }

// Weight returns the key's weight (at least 1).
func (c *Candidate) Weight() int {
	if c.key.Weight <= 0 {
		return 1
	}
	return c.key.Weight
}

// Latency returns the key's latency EWMA; zero before its first answer.
func (c *Candidate) Latency() time.Duration { return time.Duration(c.ewma.Load()) }

// Remaining returns the key's balance or quota left, +Inf when unknown.
func (c *Candidate) Remaining() float64 {
	if c.key.BalanceTotal <= 0 {
		return math.Inf(1)
	}
	return c.key.BalanceTotal - c.key.BalanceUsed - c.spent
}

// State returns the key's state (Active or HalfOpen for a candidate).
func (c *Candidate) State() State { return c.state }

func (c *Candidate) observeLatency(d time.Duration) {
	if d <= 0 {
		d = 1
	}
	for {
		old := c.ewma.Load()
		nv := int64(d)
		if old != 0 {
			nv = old + (int64(d)-old)/5
		}
		if c.ewma.CompareAndSwap(old, nv) {
			return
		}
	}
}

const bucketWidth = 5 * time.Second

func (c *Candidate) countRequest(now time.Time) {
	c.requests++
	slot := now.UnixNano() / int64(bucketWidth)
	c.advance(slot)
	c.buckets[slot%12]++
}

func (c *Candidate) advance(slot int64) {
	if slot-c.bucketBase >= 12 {
		if slot-c.bucketBase >= 24 {
			c.buckets = [12]uint32{}
		} else {
			for i := c.bucketBase + 12; i <= slot; i++ {
				c.buckets[i%12] = 0
			}
		}
		c.bucketBase = slot - 11
	}
}

func (c *Candidate) lastMinute(now time.Time) int {
	slot := now.UnixNano() / int64(bucketWidth)
	c.advance(slot)
	n := 0
	for i := slot - 11; i <= slot; i++ {
		if i >= c.bucketBase {
			n += int(c.buckets[i%12])
		}
	}
	return n
}

// svcState is one service's keys and their live state. It must not be
// copied.
type svcState struct {
	pool *Pool
	name string
	cfg  atomic.Pointer[Service]

	mu      sync.Mutex // protects everything below
	bs      breaker.Settings
	keys    map[string]*Candidate
	all     []*Candidate
	avail   []*Candidate
	heap    []*Candidate // min-heap on wakeAt
	cands   Candidates
	scratch []*Candidate
	pending []Event
	holds   []Hold
	capped  int        // keys out of rotation at their in-flight cap
	ejected int        // keys in StateOpen
	held    int        // keys with held set
	prober  *Candidate // the key a probe is out on while every key in rotation is held
	outage  bool       // the last pick found every key held and a probe out or due later
	// probeAfter is when the next probe may go after a failed one.
	probeAfter time.Time
}

// probeInterval spaces the probes of a service whose every key in
// rotation is held.
const probeInterval = time.Second

func (s *svcState) takeHolds() []Hold {
	if len(s.holds) == 0 {
		return nil
	}
	h := append([]Hold(nil), s.holds...)
	s.holds = s.holds[:0]
	return h
}

// updateSlow records whether Release must take the lock for the key: it
// is not plainly active, or it has state a success must clear.
func (s *svcState) updateSlow(c *Candidate) {
	c.slow.Store(c.state != StateActive || c.consec429 > 0 || c.strikes > 0 || c.held)
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

// allHeld reports whether every key in rotation is held.
func (s *svcState) allHeld() bool {
	for _, c := range s.avail {
		if !c.held {
			return false
		}
	}
	return len(s.avail) > 0
}

func (s *svcState) takeEvents() []Event {
	if len(s.pending) == 0 {
		return nil
	}
	ev := append([]Event(nil), s.pending...)
	s.pending = s.pending[:0]
	return ev
}

func (s *svcState) load(svc Service, bs breaker.Settings, keys []Key, now time.Time) []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg.Store(&svc)
	s.bs = bs
	next := make(map[string]*Candidate, len(keys))
	all := make([]*Candidate, 0, len(keys))
	for i := range keys {
		k := keys[i]
		c := s.keys[k.ID]
		if c != nil && c.key.Secret != k.Secret {
			s.retire(c)
			c = nil
		}
		if c == nil {
			c = &Candidate{svc: s, availIdx: -1, heapIdx: -1, idHash: hashString(k.ID)}
			c.storedSt = StateActive
			c.state = StateActive
			c.key = &k
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
		} else if c.state == StateExhausted && c.until.IsZero() && k.BalanceTotal > 0 && c.Remaining() > 0 {
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
func (s *svcState) retire(c *Candidate) {
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

func (s *svcState) admit(c *Candidate) {
	if c.availIdx >= 0 || c.throttled || c.capped.Load() {
		return
	}
	if c.state != StateActive && c.state != StateHalfOpen {
		return
	}
	c.availIdx = len(s.avail)
	s.avail = append(s.avail, c)
}

func (s *svcState) dropAvail(c *Candidate) {
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
func (s *svcState) checkCap(c *Candidate) {
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

// pick chooses a key for r at now, or nil.
func (s *svcState) pick(r Request, now time.Time) *Candidate {
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
func (s *svcState) pickAny(r Request, now time.Time) *Candidate {
	s.cands.affinity = r.Affinity
	for range 3 {
		if len(s.avail) == 0 {
			return nil
		}
		s.cands.list = s.avail
		c := s.cfg.Load().Selector.Select(&s.cands)
		if c == nil || c.availIdx < 0 || !s.fits(c, r) {
			break
		}
		if s.consume(c, r, now) {
			return c
		}
	}
	// Slow path: the selector's choice was excluded, filtered out or over
	// its rate. Offer it only the keys that fit.
	for range 3 {
		s.scratch = s.scratch[:0]
		for _, c := range s.avail {
			if s.fits(c, r) && s.hasToken(c, r, now) {
				s.scratch = append(s.scratch, c)
			}
		}
		if len(s.scratch) == 0 {
			return nil
		}
		s.cands.list = s.scratch
		c := s.cfg.Load().Selector.Select(&s.cands)
		if c == nil || c.availIdx < 0 || !s.fits(c, r) {
			c = s.scratch[0]
		}
		if s.consume(c, r, now) {
			return c
		}
	}
	return nil
}

func (s *svcState) fits(c *Candidate, r Request) bool {
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

// rateBurst is the bucket size for rpm: the configured burst (at most
// rpm) or, when zero, the full rpm.
func rateBurst(rpm, burst int) int {
	if burst <= 0 || burst > rpm {
		return rpm
	}
	return burst
}

// featureUse returns the use of c's rate-limited features at now; the
// caller holds the service's lock.
func featureUse(c *Candidate, burst int, now time.Time) map[string]FeatureUse {
	var out map[string]FeatureUse
	for f, rpm := range c.key.Features {
		if rpm <= 0 {
			continue
		}
		if out == nil {
			out = make(map[string]FeatureUse, len(c.key.Features))
		}
		full := rateBurst(rpm, burst)
		u := FeatureUse{RPM: rpm, Available: full}
		if l := c.featLim[f]; l != nil {
			u.Available = min(full, max(0, int(math.Floor(l.TokensAt(now)))))
		}
		u.Used = full - u.Available
		out[f] = u
	}
	return out
}

func (s *svcState) featureLimiter(c *Candidate, f string) *rate.Limiter {
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

func (s *svcState) hasToken(c *Candidate, r Request, now time.Time) bool {
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
func (s *svcState) consume(c *Candidate, r Request, now time.Time) bool {
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

func (s *svcState) take(c *Candidate, now time.Time) Lease {
	c.inFlight.Add(1)
	c.countRequest(now)
	s.checkCap(c)
	return Lease{c: c, key: c.key, gen: c.gen.Load(), start: now}
}

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
				s.setState(c, StateHalfOpen, time.Time{}, "breaker probing", now)
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
func (s *svcState) report(c *Candidate, o Outcome, now time.Time) {
	p := s.pool
	if o.Cost != 0 {
		c.spent += o.Cost
		if c.key.BalanceTotal > 0 && c.Remaining() <= 0 && (c.state == StateActive || c.state == StateHalfOpen) {
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
		s.setState(c, StateCooling, now.Add(d), reason, now)
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
func (s *svcState) setState(c *Candidate, st State, until time.Time, reason string, now time.Time) {
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

// The wait heap: a binary min-heap of candidates on wakeAt.

func (s *svcState) schedule(c *Candidate, t time.Time) {
	if c.heapIdx >= 0 {
		c.wakeAt = t
		s.heapFix(c.heapIdx)
		return
	}
	c.wakeAt = t
	c.heapIdx = len(s.heap)
	s.heap = append(s.heap, c)
	s.heapUp(c.heapIdx)
}

func (s *svcState) unschedule(c *Candidate) {
	i := c.heapIdx
	if i < 0 {
		return
	}
	last := len(s.heap) - 1
	if i != last {
		s.heapSwap(i, last)
	}
	s.heap[last] = nil
	s.heap = s.heap[:last]
	c.heapIdx = -1
	if i != last {
		s.heapFix(i)
	}
}

func (s *svcState) heapFix(i int) {
	if !s.heapDown(i) {
		s.heapUp(i)
	}
}

func (s *svcState) heapSwap(i, j int) {
	h := s.heap
	h[i], h[j] = h[j], h[i]
	h[i].heapIdx = i
	h[j].heapIdx = j
}

func (s *svcState) heapUp(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !s.heap[i].wakeAt.Before(s.heap[parent].wakeAt) {
			return
		}
		s.heapSwap(i, parent)
		i = parent
	}
}

func (s *svcState) heapDown(i int) bool {
	start, n := i, len(s.heap)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		m := l
		if r := l + 1; r < n && s.heap[r].wakeAt.Before(s.heap[l].wakeAt) {
			m = r
		}
		if !s.heap[m].wakeAt.Before(s.heap[i].wakeAt) {
			break
		}
		s.heapSwap(i, m)
		i = m
	}
	return i > start
}

// hashString is FNV-1a, 64 bit.
func hashString(v string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(v); i++ {
		h ^= uint64(v[i])
		h *= 1099511628211
	}
	return h
}
