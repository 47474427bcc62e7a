package proxy

import (
	"errors"
	"net/http"
	"time"

	"github.com/keypool/keypool/internal/httpx"
)

// Error is an error the [Handler] answers as it is, in keypool's JSON
// error shape {"error":{"message","type","code"}} with Status (and a
// Retry-After header when RetryAfter is positive): return one from
// [Handler.Authorize] or [Handler.Prepare] to refuse a request with any
// status, or pass one to [Record.Stop] to end a request under way. Any
// other error from those hooks is answered 500 internal_error, without
// its message.
type Error struct {
	// Status is the HTTP status (4xx or 5xx).
	Status int
	// Code is the stable, machine-readable code ("rate_limited",
	// "forbidden", …); the JSON's "type" follows from Status.
	Code string
	// Message is shown to the client: it must hold no secret.
	Message string
	// RetryAfter, when positive, is sent as Retry-After (whole seconds,
	// rounded up).
	RetryAfter time.Duration
}

// Error returns the message.
func (e *Error) Error() string { return e.Message }

// answerOf returns the answer err asks for, when it is an *Error or the
// internal error type keypoold's hooks return.
func answerOf(err error) (*httpx.Error, bool) {
	var he *httpx.Error
	if errors.As(err, &he) {
		return he, true
	}
	var pe *Error
	if errors.As(err, &pe) {
		return &httpx.Error{Status: pe.Status, Code: pe.Code, Message: pe.Message, RetryAfter: pe.RetryAfter}, true
	}
	return nil, false
}

// writeAnswer writes err as its answer (see answerOf), or as 500
// internal_error.
func writeAnswer(w http.ResponseWriter, err error) {
	if e, ok := answerOf(err); ok {
		httpx.WriteError(w, e)
		return
	}
	httpx.WriteError(w, err)
}
