package httpx

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"time"
)

// CodeRequestTimeout is the code of a 408: the client did not send its
// request body in time.
const CodeRequestTimeout = "request_timeout"

// TimedBody makes reads of r's body fail with a 408 request_timeout
// *Error when no byte arrives for idle, or when the body has not ended
// total after the first read (zero disables either bound). It sets the
// connection's read deadline through [http.ResponseController] before
// each read, so a stalled read is cut by the network poller and holds no
// goroutine past the bound; it clears the deadline when the body ends, so
// the connection's later reads are not cut. Where the connection offers
// no deadlines (http.ErrNotSupported), reads are not bounded.
func TimedBody(w http.ResponseWriter, r *http.Request, idle, total time.Duration) {
	new(BodyTimer).Wrap(w, r, idle, total)
}

// Wrap is [TimedBody] with b as the wrapper.
func (b *BodyTimer) Wrap(w http.ResponseWriter, r *http.Request, idle, total time.Duration) {
	if r.Body == nil || r.Body == http.NoBody || (idle <= 0 && total <= 0) {
		return
	}
	*b = BodyTimer{rc: r.Body, w: w, idle: idle, total: total}
	r.Body = b
}

// BodyTimer is [TimedBody]'s wrapper, for a caller that keeps it beside
// its own per-request state (no allocation of its own). Its zero value is
// ready; it serves one request.
type BodyTimer struct {
	rc          io.ReadCloser
	w           http.ResponseWriter // reached through http.ResponseController
	idle, total time.Duration
	end         time.Time // first read + total
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
		if b.end.IsZero() && b.total > 0 {
			b.end = now.Add(b.total)
		}
		dl := b.end
		if b.idle > 0 && (dl.IsZero() || now.Add(b.idle).Before(dl)) {
			dl = now.Add(b.idle)
		}
		if err := http.NewResponseController(b.w).SetReadDeadline(dl); err != nil {
			b.unsupported = errors.Is(err, http.ErrNotSupported)
		} else {
			b.set = true
		}
	}
	n, err := b.rc.Read(p)
	switch {
	case err == nil:
	case err == io.EOF:
		b.clear()
	case errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err):
		b.err = Errorf(http.StatusRequestTimeout, CodeRequestTimeout,
			"the request body was not received in time (no byte for %s, or not all of it within %s)", b.idle, b.total)
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
