package auth

import (
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2/simplelru"
)

// FailureConfig configures a [FailureLimiter]. Zero values pick the
// documented defaults.
type FailureConfig struct {
	// Max is how many failed attempts one address may make per Window
	// before it is refused. If zero, 10.
	Max int `json:"max,omitempty"`
	// Window is the period the failures are counted over. If zero, 1m.
	Window time.Duration `json:"window,omitempty"`
	// Size bounds how many addresses are tracked; the least recently seen
	// are forgotten first. If zero, 10000.
	Size int `json:"size,omitempty"`
}

// FailureLimiter slows down clients that keep presenting bad credentials:
// after Max failures from one address within Window, further bad
// credentials from that address are refused until the window ends; the
// server answers 429 rate_limited with Retry-After, without touching any
// upstream key's state. Failures are counted in a fixed window that starts
// at an address's first failure.
//
// Only invalid credentials count toward the slowdown and only they are
// refused by it: callers check a credential first and call
// [FailureLimiter.Failed] when it is bad, so a valid admin or team token
// is always served, even from an address that a script looping on a
// revoked token has slowed down (one shared NAT address, or loopback).
//
// Memory is bounded by FailureConfig.Size (an LRU of addresses). It is
// safe for concurrent use and must not be copied; it starts no goroutine.
type FailureLimiter struct {
	max    int
	window time.Duration

	mu    sync.Mutex // protects addrs
	addrs *lru.LRU[string, *failures]
}

type failures struct {
	start time.Time // start of the current window
	n     int
}

// NewFailureLimiter returns a FailureLimiter.
func NewFailureLimiter(cfg FailureConfig) *FailureLimiter {
	if cfg.Max <= 0 {
		cfg.Max = 10
	}
	if cfg.Window <= 0 {
		cfg.Window = time.Minute
	}
	if cfg.Size <= 0 {
		cfg.Size = 10000
	}
	addrs, _ := lru.NewLRU[string, *failures](cfg.Size, nil) // only fails for size <= 0
	return &FailureLimiter{max: cfg.Max, window: cfg.Window, addrs: addrs}
}

// Check reports whether addr is not slowed down at now; when it is,
// retryAfter is how long until the window ends. Only consult it for a
// credential that failed to authenticate (see [FailureLimiter.Failed]).
func (l *FailureLimiter) Check(addr string, now time.Time) (retryAfter time.Duration, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, found := l.addrs.Peek(addr)
	if !found || f.n < l.max {
		return 0, true
	}
	end := f.start.Add(l.window)
	if !now.Before(end) {
		return 0, true
	}
	return end.Sub(now), false
}

// Failed records that addr presented a bad credential at now and reports
// whether the address is slowed down: when it already made Max failures
// in the current window, slowed is true and retryAfter is how long until
// the window ends (the attempt is not counted again); otherwise the
// failure is counted and the caller answers 401 as usual.
func (l *FailureLimiter) Failed(addr string, now time.Time) (retryAfter time.Duration, slowed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, found := l.addrs.Get(addr)
	if !found {
		l.addrs.Add(addr, &failures{start: now, n: 1})
		return 0, false
	}
	end := f.start.Add(l.window)
	if !now.Before(end) || now.Before(f.start) {
		f.start, f.n = now, 1
		return 0, false
	}
	if f.n >= l.max {
		return end.Sub(now), true
	}
	f.n++
	return 0, false
}

// Fail records a failed attempt from addr at now.
func (l *FailureLimiter) Fail(addr string, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, found := l.addrs.Get(addr)
	if !found {
		l.addrs.Add(addr, &failures{start: now, n: 1})
		return
	}
	if !now.Before(f.start.Add(l.window)) || now.Before(f.start) {
		f.start, f.n = now, 0
	}
	f.n++
}

// Reset forgets addr's failures (after it authenticates, say).
func (l *FailureLimiter) Reset(addr string) {
	l.mu.Lock()
	l.addrs.Remove(addr)
	l.mu.Unlock()
}
