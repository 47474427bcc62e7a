package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
)

// Record is the one record of a request the [Handler] serves, from its
// arrival to the end of its response. The Handler owns it and fills it as
// the request goes: the service from the path, the body it read, the key
// each attempt of its [Transport] used, the status and bytes written. Its
// hooks reach it with [RecordOf] on the request's context, to keep their
// own state beside it (Data), to read what happened so far (Result) or to
// end the request (Stop). [Handler.OnDone] gets its final Result.
//
// The Handler writes it from the goroutine serving the request, where its
// hooks run; only Stop may be called from any goroutine.
type Record struct {
	// Data is the embedder's own state for this request (keypoold keeps
	// its metering and usage record here), set by a hook; the Handler
	// never reads it.
	Data any

	ctx    recordCtx
	cancel context.CancelCauseFunc
	clock  clock
	total  time.Duration // the Timeout
	idle   time.Duration // the IdleTimeout
	w      *ResponseWriter
	svc    keypool.Service

	res      Result // Service, KeyID, BalanceUnit, Attempts, Code, Err
	start    time.Time
	gone     bool // the client went away (499)
	target   *url.URL
	body     []byte
	hasBody  bool
	wsToken  bool      // the client sent its token as a WebSocket subprotocol
	upstream int       // the upstream's status
	upgraded io.Closer // the upstream connection of a 101 answer
	tokenSet *patternSet
	relaying bool                   // ReverseProxy is serving; still set if it panicked
	stopCode atomic.Pointer[string] // the code of a stop that ended the body
	client   hijackConn             // the client connection of an upgrade
	lease    leaseBody              // the served answer's body (see wrapBody)
	stream   streamBody             // the same, as the Handler relays it (see wrapStream)
	mem      memBody                // the answer, when scrubbed in memory
	inMemory bool                   // the answer was read into mem
	idleRead idleRead               // bounds the reads of an answer scrubbed in memory
	body1    memBody                // the request body of the first attempt
	out      http.Request           // the request of the first attempt
	url      url.URL                // target's storage
}

// clock is a record's one timer: it ends the request when its Timeout
// passes, and the attempt under way when its header timeout (or, while a
// small answer is read into memory, the idle timeout) passes.
type clock struct {
	mu       sync.Mutex // protects the fields below
	t        *time.Timer
	deadline time.Time               // the request's end; zero: none
	attempt  time.Time               // the attempt's end; zero: none armed
	cancel   context.CancelCauseFunc // the attempt's
	fired    bool                    // the attempt's time ran out
}

// startDeadline ends the request in d.
func (rec *Record) startDeadline(d time.Duration) {
	c := &rec.clock
	c.mu.Lock()
	c.deadline = time.Now().Add(d)
	rec.armLocked()
	c.mu.Unlock()
}

// armAttempt cancels the attempt under way (cancel, with
// errAttemptTimeout) in d, unless disarmAttempt comes first.
func (rec *Record) armAttempt(d time.Duration, cancel context.CancelCauseFunc) {
	c := &rec.clock
	c.mu.Lock()
	c.attempt, c.cancel, c.fired = time.Now().Add(d), cancel, false
	rec.armLocked()
	c.mu.Unlock()
}

// disarmAttempt stops timing the attempt and reports whether its time ran
// out first.
func (rec *Record) disarmAttempt() bool {
	c := &rec.clock
	c.mu.Lock()
	fired := c.fired
	c.attempt, c.cancel, c.fired = time.Time{}, nil, false
	c.mu.Unlock()
	return fired
}

// stopClock stops the timer, when the request is over.
func (rec *Record) stopClock() {
	c := &rec.clock
	c.mu.Lock()
	c.deadline, c.attempt, c.cancel = time.Time{}, time.Time{}, nil
	if c.t != nil {
		c.t.Stop()
	}
	c.mu.Unlock()
}

// armLocked sets the timer for the next end due. The clock's lock is held.
func (rec *Record) armLocked() {
	c := &rec.clock
	next := c.deadline
	if !c.attempt.IsZero() && (next.IsZero() || c.attempt.Before(next)) {
		next = c.attempt
	}
	if next.IsZero() {
		return // a timer that fires finds nothing due
	}
	d := time.Until(next)
	if c.t == nil {
		c.t = time.AfterFunc(d, rec.tick)
	} else {
		c.t.Reset(d)
	}
}

// tick ends what is due: the request, or the attempt under way.
func (rec *Record) tick() {
	c := &rec.clock
	c.mu.Lock()
	now := time.Now()
	if !c.deadline.IsZero() && !now.Before(c.deadline) {
		c.deadline = time.Time{}
		c.mu.Unlock()
		rec.deadline() // the attempt's context is the request's child
		return
	}
	var cancel context.CancelCauseFunc
	if !c.attempt.IsZero() && !now.Before(c.attempt) {
		cancel = c.cancel
		c.attempt, c.cancel, c.fired = time.Time{}, nil, true
	}
	rec.armLocked()
	c.mu.Unlock()
	if cancel != nil {
		cancel(errAttemptTimeout)
	}
}

// idleRead bounds each read of r by idle through the record's clock,
// which cancels the attempt (cancel) when it passes.
type idleRead struct {
	r      io.Reader
	rec    *Record
	idle   time.Duration
	cancel context.CancelCauseFunc
}

func (w *idleRead) Read(p []byte) (int, error) {
	w.rec.armAttempt(w.idle, w.cancel)
	n, err := w.r.Read(p)
	w.rec.disarmAttempt()
	return n, err
}

type recordKey struct{}

// recordCtx is the request's context as the Handler forwards it: the
// record is its value under recordKey, without a context of its own.
type recordCtx struct {
	context.Context
	rec *Record
}

func (c *recordCtx) Value(k any) any {
	if k == (recordKey{}) {
		return c.rec
	}
	return c.Context.Value(k)
}

// RecordOf returns the record of the request ctx belongs to, when a
// [Handler] serves it (from Authorize on), or nil.
func RecordOf(ctx context.Context) *Record {
	rec, _ := ctx.Value(recordKey{}).(*Record)
	return rec
}

// Stop ends the request as its response allows (see [Handler], "Ending
// early"): cause should be an *[Error] (keypoold's internal error type
// works too); the first Stop wins. It may be called from any goroutine,
// also after the request ended (then it does nothing).
func (rec *Record) Stop(cause error) { rec.cancel(cause) }

// Result returns what happened so far; [Handler.OnDone] gets the final
// one.
func (rec *Record) Result() Result {
	res := rec.res
	res.Duration = time.Since(rec.start)
	res.BytesIn = int64(len(rec.body))
	if rec.w != nil {
		res.Status, res.BytesOut = rec.w.status, rec.w.bytes
	}
	if res.Code == "" {
		res.Code = rec.stopCodeOf()
	}
	switch {
	case rec.gone:
		res.Status = 499
	case res.Status == 0 && rec.upstream != 0:
		res.Status = rec.upstream // a hijacked upgrade
	}
	return res
}

// attempted notes the key an attempt of the Transport used.
func (rec *Record) attempted(keyID, unit string, n int) {
	rec.res.KeyID, rec.res.BalanceUnit, rec.res.Attempts = keyID, unit, n
}

// deadline ends the request when its Timeout passes.
func (rec *Record) deadline() {
	rec.cancel(httpx.Errorf(http.StatusGatewayTimeout, httpx.CodeUpstreamTimeout,
		"the request to service %q did not finish within its %s deadline", rec.res.Service, rec.total))
}

// stopCause returns the answer ctx was canceled with, or nil when ctx is
// live or ended for another reason (the client went away).
func stopCause(ctx context.Context) *httpx.Error {
	if ctx.Err() == nil {
		return nil
	}
	e, _ := answerOf(context.Cause(ctx))
	return e
}

// stopCodeOf returns the code of the stop that ended the response, or "".
func (rec *Record) stopCodeOf() string {
	if c := rec.stopCode.Load(); c != nil {
		return *c
	}
	return ""
}

// ResponseWriter records the status and the size of the body written
// through it. It unwraps (Unwrap) to the writer it wraps, so that
// [http.ResponseController] reaches the real one (flushing, deadlines,
// hijacking for upgrades). The [Handler] wraps the writer it is given in
// one unless it is one already: wrap yours to read Status and
// BytesWritten after the Handler returns (keypoold does so once per
// request, for its access log).
type ResponseWriter struct {
	http.ResponseWriter
	// OnHijack, if set, is called with the client connection once an
	// upgrade hijacked it.
	OnHijack func(net.Conn)

	status   int
	bytes    int64
	hijacked net.Conn
	rec      *Record
}

// Status returns the status written: 0 before the header, 101 once the
// connection was hijacked for an upgrade.
func (w *ResponseWriter) Status() int { return w.status }

// BytesWritten returns the number of body bytes written.
func (w *ResponseWriter) BytesWritten() int64 { return w.bytes }

// Hijacked returns the hijacked connection, or nil.
func (w *ResponseWriter) Hijacked() net.Conn { return w.hijacked }

// WriteHeader records code (the first final one) and writes it.
func (w *ResponseWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// Write writes p and counts it.
func (w *ResponseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

// Flush sends buffered data to the client, if the wrapped writer can.
func (w *ResponseWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
		return
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

// Hijack takes over the connection (upgrades), notes it and calls
// OnHijack.
func (w *ResponseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if w.status == 0 {
		w.status = http.StatusSwitchingProtocols
	}
	w.hijacked = c
	if w.rec != nil {
		w.rec.client.set(c)
	}
	if w.OnHijack != nil {
		w.OnHijack(c)
	}
	return c, brw, nil
}

// Unwrap returns the wrapped ResponseWriter.
func (w *ResponseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
