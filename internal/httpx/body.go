package httpx

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// CodeRequestTimeout is the code of a 408: the client did not send its
// request body in time.
const CodeRequestTimeout = "request_timeout"

// TimedBody makes reads of r's body fail with a 408 request_timeout
// *Error when no byte arrives for idle, when the body has not ended
// total after the first read, or when it arrives slower than minRate
// bytes a second once idle has passed since the first read: the deadline
// is then first read + idle + one second per minRate bytes received
// (Apache's mod_reqtimeout MinRate). Zero or less disables any of the
// three. It sets the
// connection's read deadline through [http.ResponseController] before
// each read, so a stalled read is cut by the network poller and holds no
// goroutine past the bound; it clears the deadline when the body ends, so
// the connection's later reads are not cut. Where the connection offers
// no deadlines (http.ErrNotSupported), reads are not bounded.
func TimedBody(w http.ResponseWriter, r *http.Request, idle, total time.Duration, minRate int64) {
	new(BodyTimer).Wrap(w, r, idle, total, minRate)
}

// Wrap is [TimedBody] with b as the wrapper.
func (b *BodyTimer) Wrap(w http.ResponseWriter, r *http.Request, idle, total time.Duration, minRate int64) {
	if r.Body == nil || r.Body == http.NoBody || (idle <= 0 && total <= 0) {
		return
	}
	*b = BodyTimer{rc: r.Body, w: w, idle: idle, total: total, minRate: max(minRate, 0)}
	r.Body = b
}

// BodyTimer is [TimedBody]'s wrapper, for a caller that keeps it beside
// its own per-request state (no allocation of its own). Its zero value is
// ready; it serves one request.
type BodyTimer struct {
	rc          io.ReadCloser
	w           http.ResponseWriter // reached through http.ResponseController
	idle, total time.Duration
	minRate     int64     // bytes a second after idle; 0: no rate bound
	first       time.Time // the first read
	end         time.Time // first read + total
	received    int64     // bytes read so far
	unsupported bool
	set         bool // a deadline is set
	err         error
}

func (b *BodyTimer) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if !b.unsupported {
		now := time.Now()
		if b.first.IsZero() {
			b.first = now
			if b.total > 0 {
				b.end = now.Add(b.total)
			}
		}
		dl := b.end
		if b.idle > 0 && (dl.IsZero() || now.Add(b.idle).Before(dl)) {
			dl = now.Add(b.idle)
		}
		if b.minRate > 0 && b.idle > 0 {
			// The body must keep up minRate once idle has passed.
			earned := time.Duration(float64(b.received) / float64(b.minRate) * float64(time.Second))
			if rate := b.first.Add(b.idle + earned); rate.Before(dl) {
				dl = rate
			}
		}
		if err := http.NewResponseController(b.w).SetReadDeadline(dl); err != nil {
			b.unsupported = errors.Is(err, http.ErrNotSupported)
		} else {
			b.set = true
		}
	}
	n, err := b.rc.Read(p)
	b.received += int64(n)
	switch {
	case err == nil:
	case err == io.EOF:
		b.clear()
	case errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err):
		rate := ""
		if b.minRate > 0 {
			rate = fmt.Sprintf(", under %d bytes/s after the first %s", b.minRate, b.idle)
		}
		b.err = Errorf(http.StatusRequestTimeout, CodeRequestTimeout,
			"the request body was not received in time (no byte for %s%s, or not all of it within %s)", b.idle, rate, b.total)
		return n, b.err
	default:
		b.clear()
	}
	return n, err
}

// clear lifts the read deadline once the body has ended.
func (b *BodyTimer) clear() {
	if b.set {
		b.set = false
		_ = http.NewResponseController(b.w).SetReadDeadline(time.Time{})
	}
}

func (b *BodyTimer) Close() error { return b.rc.Close() }

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// MarshalError returns err in the JSON error shape WriteError writes
// ({"error":{"message","type","code"}}), without a trailing newline; an
// error that is not an *Error becomes 500 internal_error.
func MarshalError(err error) []byte {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error"}
	}
	var b body
	b.Error.Message, b.Error.Type, b.Error.Code = e.Message, typeFor(e.Status), e.Code
	out, _ := json.Marshal(b)
	return out
}
