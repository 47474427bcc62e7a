package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
)

// newLogger builds the server's logger from its settings.
func newLogger(cfg Config, w io.Writer) (*slog.Logger, error) {
	level, err := parseLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: durationText}
	if strings.EqualFold(cfg.LogFormat, "text") {
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return slog.New(slog.NewJSONHandler(w, opts)), nil
}

// durationText writes a time.Duration attribute as "5s", as the text
// format does, where slog's JSON format would write its nanoseconds.
func durationText(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}

// RequestIDHeader carries a request's id in and out.
const RequestIDHeader = "X-Request-Id"

type ctxKey int

const ctxInfo ctxKey = 0

// RequestID returns the id of the request ctx belongs to, or "".
func RequestID(ctx context.Context) string {
	if ri := infoFrom(ctx); ri != nil {
		return ri.id
	}
	return ""
}

// reqInfo is the server's one record of a request, allocated once when it
// arrives: its id, what handlers learn about it for its access line, the
// writer that counts its answer and, for a proxied request, its call
// (the proxy's record points to it from Authorize on). It is filled by
// the goroutine serving the request and read after the handler returns.
type reqInfo struct {
	id      string
	ids     [1]string // id, as the X-Request-Id headers' value
	service string
	// router, model and attempts are set for a request to a router: the
	// router, the upstream model and the targets tried (service is the
	// last one).
	router   string
	model    string
	attempts int
	keyID    string
	teamID   string
	tokenID  string
	code     string // keypool error code, if any
	retries  int
	// cred is the client's credential once a proxied request read it
	// (credKnown), so that the access line redacts it without reading
	// the headers again. It is never logged.
	cred      string
	credKnown bool

	w      proxy.ResponseWriter
	body   httpx.BodyTimer
	call   call
	open   openCall
	routed routedCaller // a router's caller (authorizeRouter)
}

func infoFrom(ctx context.Context) *reqInfo {
	ri, _ := ctx.Value(ctxInfo).(*reqInfo)
	return ri
}

// validRequestID accepts a client's id when it is a sane id: 1 to 128 of
// A-Z a-z 0-9 . _ : - (no spaces, quotes, slashes or anything a log
// reader or an upstream could misread).
func validRequestID(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return false
		}
	}
	return true
}

// clientRequestID returns the client's X-Request-Id when it is a sane id
// that does not hold the credential the request carries (a client that
// sent its token there would have it logged, stored and forwarded), or "".
func clientRequestID(r *http.Request) string {
	id := r.Header.Get(RequestIDHeader)
	if !validRequestID(id) {
		return ""
	}
	if cred, _ := proxy.Credential(r); cred != "" && (strings.Contains(id, cred) || strings.Contains(cred, id) && len(id) >= 8) {
		return ""
	}
	return id
}

// idPrefix makes request ids unique across processes; a counter makes
// them unique within one, without a crypto/rand read per request.
var (
	idPrefix  = func() string { var b [6]byte; _, _ = rand.Read(b[:]); return hex.EncodeToString(b[:]) }()
	idCounter atomic.Uint64
)

// newRequestID returns a 24-character id: 12 hex of process prefix, 12 of
// counter.
func newRequestID() string {
	var b [24]byte
	copy(b[:12], idPrefix)
	n := idCounter.Add(1)
	const digits = "0123456789abcdef"
	for i := 23; i >= 12; i-- {
		b[i] = digits[n&0xf]
		n >>= 4
	}
	return string(b[:])
}

// connSet tracks hijacked connections.
type connSet struct {
	mu    sync.Mutex // protects conns and closed
	conns map[net.Conn]struct{}
	// closed is set once a shutdown closed the set: connections hijacked
	// later are closed at once.
	closed bool
}

// track adds c to the set (add) or removes it; a connection added after
// closeAll is closed at once.
func (cs *connSet) track(c net.Conn, add bool) {
	cs.mu.Lock()
	if add && cs.closed {
		cs.mu.Unlock()
		_ = c.Close()
		return
	}
	if cs.conns == nil {
		cs.conns = map[net.Conn]struct{}{}
	}
	if add {
		cs.conns[c] = struct{}{}
	} else {
		delete(cs.conns, c)
	}
	cs.mu.Unlock()
}

// add registers a connection hijacked for an upgrade, so that a shutdown
// closes it after the drain.
func (cs *connSet) add(c net.Conn) { cs.track(c, true) }

// closeAll closes every hijacked connection (WebSockets) and returns how
// many there were.
func (cs *connSet) closeAll() int {
	cs.mu.Lock()
	cs.closed = true
	conns := cs.conns
	cs.conns = nil
	cs.mu.Unlock()
	for c := range conns {
		_ = c.Close()
	}
	return len(conns)
}

// observe wraps h with request ids, panic safety, hijack tracking and the
// access log: one line per request, naming no secret (the query string is
// never logged: it may carry ?api_key=).
func (s *Server) observe(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		id := clientRequestID(r)
		if id == "" {
			id = newRequestID()
		}
		ri := &reqInfo{id: id}
		ri.ids[0] = id
		ids := ri.ids[:] // both headers' value; never changed in place
		if r.Header.Get(RequestIDHeader) != id {
			r.Header[RequestIDHeader] = ids
		}
		w.Header()[RequestIDHeader] = ids
		ri.w.ResponseWriter, ri.w.OnHijack = w, s.onHijack
		r = r.WithContext(context.WithValue(r.Context(), ctxInfo, ri))
		sw := &ri.w
		ri.body.Wrap(w, r, time.Duration(s.cfg.BodyIdleTimeout), time.Duration(s.cfg.BodyTimeout), s.cfg.BodyMinRate)
		s.inflight.Add(1)
		defer func() {
			s.inflight.Add(-1)
			if c := sw.Hijacked(); c != nil {
				s.hijacked.track(c, false)
			}
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					status := 0
					if r.Context().Err() != nil {
						status = 499 // the client went away mid-response
					}
					s.access(r, ri, status, start)
					panic(p)
				}
				s.log.Error("panic serving request", "request_id", id, "path", r.URL.Path, "panic", redactPanic(p))
				if sw.Status() == 0 {
					writeError(sw, errInternal)
				}
			}
			s.access(r, ri, 0, start)
		}()
		h.ServeHTTP(sw, r)
	})
}

// redactCredential returns s with the credential r carries replaced: a
// client that put its token in the path (refused by the proxy) must not
// have it logged. ri, when not nil, may know the credential already.
func redactCredential(r *http.Request, ri *reqInfo, s string) string {
	var cred string
	if ri != nil && ri.credKnown {
		cred = ri.cred
	} else {
		cred, _ = proxy.Credential(r)
	}
	if len(cred) >= 8 && strings.Contains(s, cred) {
		return strings.ReplaceAll(s, cred, proxy.Redacted)
	}
	return s
}

// safePath bounds a logged path. Paths are not expected to hold secrets;
// query strings (which may) are never logged.
func safePath(p string) string {
	if len(p) > 256 {
		return p[:256] + "…"
	}
	return p
}

func remoteIP(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// redactPanic names a panic value's type only: its message might quote a
// request.
func redactPanic(p any) string { return fmt.Sprintf("%T", p) }
