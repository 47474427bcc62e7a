package keypool

import (
	"errors"
	"fmt"
	"time"
)

// Errors returned by a [Pool]. Test them with errors.Is.
var (
	// ErrUnknownService means no service of that name is configured.
	ErrUnknownService = errors.New("keypool: unknown service")
	// ErrNoKeyAvailable means every key of the service is cooling down,
	// open, invalid, exhausted, disabled or at its limits. The error is a
	// *[NoKeyError] that says when the first key is expected back.
	ErrNoKeyAvailable = errors.New("keypool: no key available")
	// ErrInvalidConfig wraps every configuration error.
	ErrInvalidConfig = errors.New("keypool: invalid configuration")
	// ErrUpstreamUnavailable means the service's upstream is failing: its
	// keys are ejected by their breakers or held in rotation while a probe
	// request tests the upstream. The error is an *[UnavailableError].
	ErrUpstreamUnavailable = errors.New("keypool: upstream unavailable")
)

// NoKeyError is returned by [Pool.Acquire] when no key can serve. It wraps
// [ErrNoKeyAvailable].
type NoKeyError struct {
	// Service is the service that had no key.
	Service string
	// RetryAfter is how long until the first key is expected back; it is
	// at least one second.
	RetryAfter time.Duration
	// Until is the time RetryAfter points at.
	Until time.Time
	// Reason says why, for people: "the service has no keys", or what its
	// keys are doing ("3 keys: 2 cooling, 1 invalid").
	Reason string
}

// Error says which service had no key and when to come back.
func (e *NoKeyError) Error() string {
	msg := fmt.Sprintf("keypool: no key available for service %q, retry after %s", e.Service, e.RetryAfter.Round(time.Second))
	if e.Reason != "" {
		msg += " (" + e.Reason + ")"
	}
	return msg
}

// Unwrap returns [ErrNoKeyAvailable].
func (e *NoKeyError) Unwrap() error { return ErrNoKeyAvailable }

// UnavailableError is returned by [Pool.Acquire] when no key can serve
// because the upstream is failing, not because keys are rate-limited or
// spent: every key that could serve is ejected by its breaker, or every
// key in rotation tripped beyond the ejection cap and a probe request is
// already testing the upstream. keypoold answers it with 503
// upstream_unavailable. It wraps [ErrUpstreamUnavailable].
type UnavailableError struct {
	// Service is the failing service.
	Service string
	// RetryAfter is how long until the next probe is expected to tell;
	// it is at least one second.
	RetryAfter time.Duration
	// Reason says why, for people.
	Reason string
}

// Error says which service is unavailable and when to come back.
func (e *UnavailableError) Error() string {
	msg := fmt.Sprintf("keypool: upstream of service %q unavailable, retry after %s", e.Service, e.RetryAfter.Round(time.Second))
	if e.Reason != "" {
		msg += " (" + e.Reason + ")"
	}
	return msg
}

// Unwrap returns [ErrUpstreamUnavailable].
func (e *UnavailableError) Unwrap() error { return ErrUpstreamUnavailable }
