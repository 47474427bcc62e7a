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
