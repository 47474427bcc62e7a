package keypool

import (
	"fmt"
	"strings"
	"time"

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
	// Classifier decides what an upstream answer says about the key that
	// served it, for proxies that classify per service (proxy.Transport
	// does). If nil, the proxy's own classifier.
	Classifier Classifier
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
	// Remote reports whether the change came from elsewhere through
	// [Pool.Apply] rather than from this pool's own outcomes and
	// decisions. A listener that shares or persists events skips remote
	// ones: their origin already did. It is never encoded; Apply ignores
	// it.
	Remote bool `json:"-"`
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
