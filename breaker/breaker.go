// Package breaker is keypool's per-key circuit breaker, built on
// github.com/sony/gobreaker/v2.
//
// gobreaker counts outcomes and moves between closed, open and half-open;
// this package adds what a key pool needs around it:
//
//   - Time is the caller's. The open period is measured on the clock passed
//     to [Breaker.Failure] and [Breaker.Ready], so tests never sleep;
//     gobreaker's own timer is set to expire at once and only moves it to
//     half-open when the caller says the open period is over.
//   - The steady state costs nothing. A success while closed with no
//     failure pending is one atomic load; gobreaker is consulted only after
//     a failure and while half-open, so the hot path does not allocate.
//   - Half-open ramps traffic back: at most [Settings.HalfOpenMaxRequests]
//     probes run at once (one by default), and that many consecutive
//     successes close it.
//   - Ejections grow, as in Envoy's outlier detection: the n-th trip in a
//     row stays open OpenTimeout × n, up to MaxOpenTimeout. The count
//     starts over when a trip comes more than MaxOpenTimeout after the end
//     of the previous open period (the key was healthy that long).
//
// Only upstream faults should be reported as failures (5xx, timeouts,
// connection resets). Client cancellations and 4xx answers are neither
// success nor failure: do not report them.
package breaker

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
)

// State is a breaker's position.
type State uint8

// Breaker states.
const (
	Closed State = iota
	Open
	HalfOpen
)

// String returns "closed", "open" or "half_open".
func (s State) String() string {
	switch s {
	case Open:
		return "open"
	case HalfOpen:
		return "half_open"
	default:
		return "closed"
	}
}

// Settings configure a Breaker. The zero value is not valid: start from
// [DefaultSettings].
type Settings struct {
	// ConsecutiveFailures trips the breaker after this many failures in a
	// row. If zero, 5.
	ConsecutiveFailures uint32 `json:"consecutive_failures,omitempty" yaml:"consecutive_failures,omitempty"`
	// OpenTimeout is how long the breaker stays open before probing after
	// its first trip; the n-th consecutive trip stays open n times as
	// long. If zero, 30 seconds.
	OpenTimeout time.Duration `json:"open_timeout,omitempty" yaml:"open_timeout,omitempty"`
	// MaxOpenTimeout caps the grown open period. If zero, 10 ×
	// OpenTimeout (5 minutes by default).
	MaxOpenTimeout time.Duration `json:"max_open_timeout,omitempty" yaml:"max_open_timeout,omitempty"`
	// HalfOpenMaxRequests is how many probes may run at once while half-open,
	// and how many consecutive successes close the breaker. It must be at
	// least 1: zero would never close an open breaker.
	HalfOpenMaxRequests uint32 `json:"half_open_max_requests" yaml:"half_open_max_requests"`
}

// DefaultSettings returns 5 consecutive failures, 30 s open (growing by
// 30 s per consecutive trip up to 5 minutes), 1 probe.
func DefaultSettings() Settings {
	return Settings{ConsecutiveFailures: 5, OpenTimeout: 30 * time.Second, MaxOpenTimeout: 5 * time.Minute, HalfOpenMaxRequests: 1}
}

// ErrInvalidSettings is wrapped by [Settings.Validate] errors.
var ErrInvalidSettings = errors.New("breaker: invalid settings")

// Validate reports an error for settings that cannot work.
func (s Settings) Validate() error {
	if s.HalfOpenMaxRequests == 0 {
		return fmt.Errorf("%w: half_open_max_requests must be at least 1 (0 would keep a tripped key out forever)", ErrInvalidSettings)
	}
	if s.OpenTimeout < 0 {
		return fmt.Errorf("%w: open_timeout must not be negative", ErrInvalidSettings)
	}
	if s.MaxOpenTimeout < 0 {
		return fmt.Errorf("%w: max_open_timeout must not be negative", ErrInvalidSettings)
	}
	return nil
}

func (s Settings) withDefaults() Settings {
	if s.ConsecutiveFailures == 0 {
		s.ConsecutiveFailures = 5
	}
	if s.OpenTimeout == 0 {
		s.OpenTimeout = 30 * time.Second
	}
	if s.MaxOpenTimeout == 0 {
		s.MaxOpenTimeout = 10 * s.OpenTimeout
	}
	if s.MaxOpenTimeout < s.OpenTimeout {
		s.MaxOpenTimeout = s.OpenTimeout
	}
	return s
}

// Breaker is one key's circuit breaker. It is safe for concurrent use and
// must not be copied.
type Breaker struct {
	settings Settings
	cb       atomic.Pointer[gobreaker.TwoStepCircuitBreaker[struct{}]]

	// state mirrors the breaker's position for lock-free reads.
	state atomic.Uint32
	// trips counts transitions to open, so a report can tell it tripped.
	trips atomic.Uint64
	// dirty is set while a failure is pending in the closed state, so that
	// the next success must reach gobreaker to reset the count.
	dirty atomic.Bool
	// openUntil is the end of the open period in Unix nanoseconds.
	openUntil atomic.Int64
	// ejections counts consecutive trips; lastEnd is the end of the last
	// open period in Unix nanoseconds. Both are written only in report,
	// under gobreaker's serialisation of a trip.
	ejections atomic.Int64
	lastEnd   atomic.Int64
}

var errFailure = errors.New("upstream failure")

// New returns a closed breaker.
func New(s Settings) (*Breaker, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	b := &Breaker{settings: s.withDefaults()}
	b.cb.Store(b.newCB())
	return b, nil
}

func (b *Breaker) newCB() *gobreaker.TwoStepCircuitBreaker[struct{}] {
	s := b.settings
	return gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		MaxRequests: s.HalfOpenMaxRequests,
		// The caller's clock decides when the open period ends; gobreaker
		// moves to half-open as soon as it is asked after that.
		Timeout: time.Nanosecond,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.ConsecutiveFailures >= s.ConsecutiveFailures
		},
		// Called with gobreaker's lock held: only atomics here.
		OnStateChange: func(_ string, _, to gobreaker.State) {
			switch to {
			case gobreaker.StateOpen:
				b.trips.Add(1)
				b.state.Store(uint32(Open))
			case gobreaker.StateClosed:
				b.state.Store(uint32(Closed))
			}
		},
	})
}

// Settings returns the breaker's settings with defaults applied.
func (b *Breaker) Settings() Settings { return b.settings }

// State returns the breaker's position.
func (b *Breaker) State() State { return State(b.state.Load()) }

// OpenUntil returns when the open period ends; zero unless open.
func (b *Breaker) OpenUntil() time.Time {
	if b.State() != Open {
		return time.Time{}
	}
	return time.Unix(0, b.openUntil.Load())
}

// Ready reports whether the breaker lets requests through at now. An open
// breaker whose period is over moves to half-open and is ready.
func (b *Breaker) Ready(now time.Time) bool {
	if b.State() != Open {
		return true
	}
	if now.UnixNano() < b.openUntil.Load() {
		return false
	}
	b.state.CompareAndSwap(uint32(Open), uint32(HalfOpen))
	return true
}

// Success records a successful call and returns the state after it.
// Reports that arrive while open (calls that started before it tripped)
// are ignored.
func (b *Breaker) Success() State {
	st := b.State()
	if st == Open || (st == Closed && !b.dirty.Load()) {
		return st
	}
	b.dirty.Store(false)
	return b.report(nil, time.Time{})
}

// Failure records an upstream failure at now and returns the state after
// it: Open means the breaker tripped (or re-tripped from half-open) and
// stays open until [Breaker.OpenUntil]. Reports that arrive while open are
// ignored.
func (b *Breaker) Failure(now time.Time) State {
	if b.State() == Open {
		return Open
	}
	st := b.report(errFailure, now)
	// Marked after the failure is counted, so a concurrent Success that
	// clears the mark cannot leave a counted failure unmarked.
	b.dirty.Store(true)
	return st
}

// Ejections returns how many consecutive trips the breaker has seen (the
// multiplier of its current or last open period).
func (b *Breaker) Ejections() int { return int(b.ejections.Load()) }

// Reset closes the breaker and forgets its failure counts. The ejection
// history (how long the next trip stays open) is kept: it decays with
// time only.
func (b *Breaker) Reset() {
	b.cb.Store(b.newCB())
	b.dirty.Store(false)
	b.openUntil.Store(0)
	b.state.Store(uint32(Closed))
}

func (b *Breaker) report(err error, now time.Time) State {
	trips := b.trips.Load()
	done, aerr := b.cb.Load().Allow()
	if aerr == nil {
		done(err)
	}
	if b.trips.Load() != trips {
		n := b.ejections.Load() + 1
		if last := b.lastEnd.Load(); last != 0 && now.UnixNano()-last > int64(b.settings.MaxOpenTimeout) {
			n = 1 // healthy for long enough since the last ejection
		}
		b.ejections.Store(n)
		d := b.settings.MaxOpenTimeout
		if n <= int64(d/b.settings.OpenTimeout) {
			d = min(d, time.Duration(n)*b.settings.OpenTimeout)
		}
		end := now.Add(d).UnixNano()
		b.lastEnd.Store(end)
		b.openUntil.Store(end)
		b.state.Store(uint32(Open))
	}
	return b.State()
}
