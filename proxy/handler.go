package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
)

// DefaultMaxBodyBytes is the request body limit of a [Handler] whose
// MaxBodyBytes is zero.
const DefaultMaxBodyBytes = 32 << 20

// Handler is keypoold's data plane: it serves ANY /v1/{service}/{rest} by
// forwarding to {base_url}/{rest} (query kept, the base URL's own path
// prefix kept) with a pooled key. It is built on [httputil.ReverseProxy]
// (with Rewrite) over a [Transport], so failover to another key happens
// before anything is written to the client.
//
// For each request, before any key is picked, it:
//
//  1. checks the request target and rejects with 400 bad_request CONNECT,
//     absolute-form and asterisk-form targets, control characters, dot
//     segments ("." and "..", percent-encoded too, and with ;parameters
//     such as "..;x=y", which Tomcat-style servers read as ".."), encoded slashes and
//     backslashes (%2f, %5c, double-encoded too), backslashes and empty
//     segments, so a key never reaches another host or path than the
//     service's;
//  2. reads the inbound credential with [Credential] (two different ones
//     are a 400; a request whose context is a [CredentialContext] brings
//     it along instead) and calls Authorize (with the service name as written in
//     the path); only then is an unknown service answered 404
//     unknown_service, so that unauthenticated callers cannot probe which
//     services exist;
//  3. reads the body, up to MaxBodyBytes (413 request_too_large above it),
//     so that it can be replayed byte for byte on another key (a read
//     error that is an answer, such as keypoold's 408 request_timeout
//     for a body that stalls, is answered as it is);
//  4. calls Prepare, if set, with the buffered body (keypoold meters,
//     checks model allow-lists and admits budgets there).
//
// A credential Authorize accepted (the team token) must not travel on:
// a path or a body that holds it in any spelling (as is, percent-encoded,
// JSON-escaped, base64) is refused with 400 bad_request before a key is
// picked, since keypoold forwards those as they are; every other header
// and query parameter that holds it is removed, whatever its name (api-key,
// X-Auth-Token, Ocp-Apim-Subscription-Key, ?access_token=, …).
//
// The forwarded request carries none of the client's credentials. The
// headers removed are a deny-list, because SDKs send many vendor headers
// the upstream needs (OpenAI-Beta, anthropic-version, anthropic-beta,
// Cartesia-Version, X-Stainless-*, Idempotency-Key, …) that an allow-list
// would have to chase: Authorization, X-Api-Key, Xi-Api-Key,
// X-Goog-Api-Key, Cookie, Proxy-Authorization, Forwarded, every
// X-Forwarded-* and X-Keypool-* header, and the client-address headers
// X-Real-Ip, X-Client-Ip, True-Client-Ip, Cf-Connecting-Ip,
// Fastly-Client-Ip and X-Cluster-Client-Ip; the query parameters api_key
// and key; and the "token, <t>" entries of Sec-WebSocket-Protocol (other
// subprotocols are kept; when none is left and the upstream picks none, the
// 101 answer names "token" so that browsers accept it). Hop-by-hop headers
// are removed by ReverseProxy. No X-Forwarded-For is added: the client's
// address is not the upstream's business. The Transport then injects the
// key and sets the service's Headers (proxy_headers), replacing client
// headers of the same name.
//
// Answers: the upstream's own answers (its 4xx and 5xx included) pass
// through unchanged, except that every spelling of the key's secret and of
// the team token is scrubbed from their headers, bodies and trailers (see
// [Transport]; requests ask for Accept-Encoding: identity so that bodies
// can be read), and [HeaderKeyID] is set. Redirects
// are returned to the client, never followed. Streams are flushed as they
// arrive and WebSocket upgrades pass through with the pooled key. Errors
// keypool itself answers are JSON ({"error":{"message","type","code"}}),
// mapped in one place: no key available → 429 no_key_available with
// Retry-After; the upstream failing on every key that could serve (see
// [keypool.UnavailableError]) → 503 upstream_unavailable with
// Retry-After; upstream unreachable → 502 upstream_unreachable; upstream
// timeout → 504 upstream_timeout. A client that goes away cancels the
// upstream request without penalising the key; nothing is written and the
// [Result] has status 499 and code "canceled" — also when it goes away in
// the middle of a streamed answer.
//
// Each request has one [Record], from its arrival to the end of its
// response, on its context from Authorize on ([RecordOf]): the hooks keep
// their own state in it and read what happened so far; OnDone gets its
// final [Result]. The Handler wraps the ResponseWriter it is given in a
// [ResponseWriter] unless it is one already, so a caller that wraps
// first (for its access log) adds no second wrapper.
//
// Ending early. A request stopped with [Record.Stop] and an *[Error]
// (keypoold does so when the caller's token is revoked, and the Handler
// itself when Timeout passes or the upstream is silent for IdleTimeout)
// is answered with that error in
// the form the response allows: before the response headers, as the JSON
// error with its status; in a text/event-stream, as a final event
// "event: error\ndata: {"error":{…}}\n\n" after the last complete event,
// and the stream ends cleanly; in a WebSocket, as a close frame at the next
// frame boundary (1008 policy violation for 401 and 403, 1013 try again
// later for 503, 1011 otherwise) with the error's message as its reason,
// after which the client has one second to close its side; in any other
// body, by cutting the connection (the client sees a truncated body).
//
// Set the fields before the first request and do not change them after;
// a Handler must not be copied after first use. It is safe for concurrent
// use.
type Handler struct {
	// Pool supplies services and keys. Required.
	Pool *keypool.Pool
	// Transport sends requests with keys. Its Pool and Service fields are
	// ignored: the Handler uses its own Pool and the service named in the
	// path. If nil, a zero Transport (3 attempts over
	// http.DefaultTransport).
	Transport *Transport
	// Authorize is called with the inbound credential ("" when the client
	// sent none) before any key is picked. It returns the request to go on
	// with (for example with the caller's identity in its context; nil
	// means r) or an error: an *[Error] is written as it is (its status,
	// code, message and Retry-After), any other error as 500
	// internal_error. If nil, every request is let through: only for
	// embedding behind another authenticating layer. The request's
	// [Record] is on its context.
	Authorize func(r *http.Request, service, credential string) (*http.Request, error)
	// MaxBodyBytes caps request bodies, which are buffered for replay. If
	// zero, [DefaultMaxBodyBytes] (32 MiB). A larger Content-Length, or a
	// chunked body that grows larger, is answered 413 request_too_large
	// before any key is picked.
	MaxBodyBytes int64
	// Prepare, if set, is called for every authorized request to a known
	// service once its body has been read (body is nil when the request
	// has none), before a key is picked: to look into the body (for
	// metering), rewrite it, set request headers, or refuse the request.
	// It returns the request to go on with (nil means r), the body to
	// forward instead (nil keeps body; it is replayed on a retry like the
	// original), or an error, answered as Authorize's errors are.
	Prepare func(r *http.Request, svc *keypool.Service, body []byte) (*http.Request, []byte, error)
	// ModifyResponse, if set, is called with every upstream response after
	// keypool's own changes (for metering, say). resp.Request's context is
	// the one Authorize returned. An error is answered 502.
	ModifyResponse func(*http.Response) error
	// OnDone, if set, is called once per request, after the response is
	// finished (or the handler gave up), with what happened. r is the
	// request Authorize returned, if it was called.
	OnDone func(r *http.Request, res Result)
	// Logger receives errors (never a secret). If nil, slog.Default().
	Logger *slog.Logger
	// FlushInterval is passed to ReverseProxy: how often to flush a
	// response of known length while copying it. Zero means no periodic
	// flush for those; whatever the value, ReverseProxy flushes after
	// every write (-1) for text/event-stream responses and responses of
	// unknown length, so SSE and other streams reach the client as they
	// arrive. Negative flushes after every write for all responses.
	FlushInterval time.Duration
	// IdleTimeout bounds each read of an upstream response body (the wait
	// between stream events): a stream that stays silent longer ends with
	// a final SSE error event (504 upstream_timeout) or, for other bodies,
	// a cut connection. A service's own IdleTimeout overrides it. If zero,
	// reads are not bounded. It does not apply to WebSockets.
	IdleTimeout time.Duration
	// Timeout bounds a whole request, failover and response body
	// included: 504 upstream_timeout before the response started, a final
	// SSE error event or a cut body after. A service's own Timeout
	// overrides it. If zero, none. It does not apply to WebSockets.
	Timeout time.Duration

	once sync.Once
	rp   *httputil.ReverseProxy
	tr   *Transport
}

// Result says what happened to one request the [Handler] served.
type Result struct {
	// Service is the service named in the path ("" if the path was bad).
	Service string
	// KeyID is the last key tried ("" if none was picked).
	KeyID string
	// BalanceUnit is the balance unit of the key KeyID names ("usd",
	// "tokens", "requests", …), so that metered spend can be charged to
	// it; "" when it has none or no key was picked.
	BalanceUnit string
	// Status is the status sent to the client (101 for an upgrade, 499
	// when the client went away first).
	Status int
	// Attempts is how many keys were tried.
	Attempts int
	// BytesIn is the request body's size.
	BytesIn int64
	// BytesOut is how many response body bytes were written.
	BytesOut int64
	// Duration is the time from the request's arrival to the end of its
	// response.
	Duration time.Duration
	// Code is the error code when keypool answered itself (bad_request,
	// unknown_service, no_key_available, upstream_unreachable, …, or
	// "canceled"); "" when the upstream's answer was relayed.
	Code string
	// Err is the error behind Code, if any; it never holds a secret.
	Err error
}

func (h *Handler) init() {
	h.tr = h.Transport
	if h.tr == nil {
		h.tr = &Transport{}
	}
	h.rp = &httputil.ReverseProxy{
		Rewrite:        h.rewrite,
		Transport:      handlerTransport{h},
		FlushInterval:  h.FlushInterval,
		ErrorHandler:   h.errorHandler,
		ModifyResponse: h.modifyResponse,
		ErrorLog:       slog.NewLogLogger(h.logger().Handler(), slog.LevelWarn),
		BufferPool:     &copyBuffers,
	}
}

// copyBuffers recycles the 32 KiB buffers ReverseProxy copies bodies with,
// which would otherwise be allocated per request.
var copyBuffers bufferPool

type bufferPool struct{ p sync.Pool }

// copyBufferSize is the size of the buffers in copyBuffers.
const copyBufferSize = 32 << 10

// Get returns a buffer of copyBufferSize bytes.
func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[copyBufferSize]byte); ok {
		return v[:]
	}
	return new([copyBufferSize]byte)[:]
}

// Put recycles buf (as an array pointer: no allocation).
func (b *bufferPool) Put(buf []byte) {
	if cap(buf) < copyBufferSize {
		return
	}
	b.p.Put((*[copyBufferSize]byte)(buf[:copyBufferSize]))
}

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}

// ServeHTTP proxies r; see [Handler].
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.once.Do(h.init)
	rw, ok := w.(*ResponseWriter)
	if !ok {
		rw = &ResponseWriter{ResponseWriter: w}
	}
	st := &Record{start: time.Now(), w: rw}
	rw.rec = st
	client := r.Context()
	inner, cancel := context.WithCancelCause(client)
	defer cancel(nil)
	defer st.stopClock()
	st.ctx, st.cancel = recordCtx{inner, st}, cancel
	r = r.WithContext(&st.ctx)
	if h.OnDone != nil {
		defer func() {
			if st.relaying && !st.gone && client.Err() != nil {
				// ReverseProxy gave up copying the answer (it panics with
				// http.ErrAbortHandler): the client went away mid-response.
				st.gone, st.res.Code = true, "canceled"
			}
			h.OnDone(r, st.Result())
		}()
	}
	service, restRaw, err := parseTarget(r)
	if err != nil {
		h.reject(rw, st, err)
		return
	}
	st.res.Service = service
	cred, err := credentialOf(client, r)
	if err != nil {
		h.reject(rw, st, err)
		return
	}
	if h.Authorize != nil {
		r2, err := h.Authorize(r, service, cred)
		if err != nil {
			h.reject(rw, st, err)
			return
		}
		if r2 != nil {
			r = r2
		}
	}
	// Only a credential Authorize accepted is searched for (and cached).
	st.tokenSet = setFor(cred)
	if err := checkTokenInPath(restRaw, st.tokenSet); err != nil {
		h.reject(rw, st, err)
		return
	}
	// Authorize runs first so that unauthenticated callers cannot probe
	// which services exist.
	st.svc, ok = h.Pool.Service(service)
	svc := &st.svc
	if !ok {
		h.reject(rw, st, httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service))
		return
	}
	if err := h.readBody(rw, r, st); err != nil {
		h.reject(rw, st, err)
		return
	}
	if h.Prepare != nil {
		r2, body, err := h.Prepare(r, svc, st.body)
		if err != nil {
			h.reject(rw, st, err)
			return
		}
		if r2 != nil {
			r = r2
		}
		if body != nil && st.hasBody {
			st.body = body
		}
	}

	target, err := targetURL(&st.url, svc.BaseURL, restRaw, r.URL.RawQuery, st.tokenSet)
	if err != nil {
		h.reject(rw, st, err)
		return
	}
	st.target = target
	_, st.wsToken = wsToken(r.Header)
	if r.Header.Get("Upgrade") == "" {
		st.idle = pick(svc.IdleTimeout, h.IdleTimeout)
		if st.total = pick(svc.Timeout, h.Timeout); st.total > 0 {
			st.startDeadline(st.total)
		}
	}
	st.relaying = true
	h.rp.ServeHTTP(rw, r)
	st.relaying = false
	if st.upgraded != nil {
		// ReverseProxy closes the upstream connection from a goroutine;
		// close it now so the key is released before OnDone.
		_ = st.upgraded.Close()
	}
}

// readBody reads the request body into st (see [ReadBody]) and refuses
// one that holds the client's credential.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request, st *Record) error {
	b, has, err := ReadBody(w, r, h.MaxBodyBytes)
	if err != nil || !has {
		return err
	}
	st.body, st.hasBody = b, true
	return checkTokenInBody(st.body, st.tokenSet)
}

// ReadBody reads r's body for replay, up to max bytes (zero means
// [DefaultMaxBodyBytes]); has is false when the request has none. Its
// errors are *httpx.Error: 413 request_too_large above max, a read error
// that is an *httpx.Error as it is (keypoold's 408 request_timeout for a
// body that stalls), 400 bad_request for any other. A [BufferedBody] is
// taken as it is, without a copy.
func ReadBody(w http.ResponseWriter, r *http.Request, max int64) (body []byte, has bool, err error) {
	if max <= 0 {
		max = DefaultMaxBodyBytes
	}
	if r.ContentLength > max {
		return nil, false, httpx.Errorf(http.StatusRequestEntityTooLarge, httpx.CodeRequestTooLarge, "request body is larger than %d bytes", max)
	}
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return nil, false, nil
	}
	if bb, ok := r.Body.(*BufferedBody); ok && bb.off == 0 {
		bb.off = len(bb.b)
		return bb.b, true, nil
	}
	var b []byte
	if r.ContentLength > 0 {
		// One exact buffer, then the read that sees the end (net/http
		// ends the body at its Content-Length; a body that goes on is
		// too large).
		b = make([]byte, r.ContentLength)
		var n int
		if n, err = io.ReadFull(r.Body, b); err == nil {
			var one [1]byte
			switch k, rerr := r.Body.Read(one[:]); {
			case k > 0:
				err = &http.MaxBytesError{Limit: r.ContentLength}
			case rerr != io.EOF:
				err = rerr
			}
		}
		b = b[:n]
	} else {
		var buf bytes.Buffer
		_, err = buf.ReadFrom(http.MaxBytesReader(w, r.Body, max))
		b = buf.Bytes()
	}
	if err != nil {
		var mbe *http.MaxBytesError
		var he *httpx.Error
		switch {
		case errors.As(err, &he):
			return nil, false, he
		case errors.As(err, &mbe):
			return nil, false, httpx.Errorf(http.StatusRequestEntityTooLarge, httpx.CodeRequestTooLarge, "request body is larger than %d bytes", max)
		}
		return nil, false, httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "reading the request body failed")
	}
	return b, true, nil
}

// BufferedBody is a request body already in memory: [ReadBody] (and so a
// [Handler]) takes its bytes as they are instead of copying them. A
// caller that hands one request body to several Handlers in turn (a
// router trying one service after another) wraps it with
// [NewBufferedBody] (or [BufferedBody.Reset]) for each; the bytes must not change while in use.
type BufferedBody struct {
	b   []byte
	off int
}

// NewBufferedBody returns a body reading b.
func NewBufferedBody(b []byte) *BufferedBody { return &BufferedBody{b: b} }

// Reset makes bb read b from its start, as [NewBufferedBody] would: for
// a BufferedBody held in a larger value, without an allocation of its own.
func (bb *BufferedBody) Reset(b []byte) { bb.b, bb.off = b, 0 }

// Read reads the body.
func (bb *BufferedBody) Read(p []byte) (int, error) {
	if bb.off >= len(bb.b) {
		return 0, io.EOF
	}
	n := copy(p, bb.b[bb.off:])
	bb.off += n
	return n, nil
}

// Close does nothing.
func (bb *BufferedBody) Close() error { return nil }

// pick returns the service's setting when it has one, else the default.
// bases caches parsed base URLs (read-only once parsed), so that a request
// parses none; it is emptied when it holds baseCacheMax.
var bases struct {
	mu sync.Mutex // protects m
	m  map[string]*url.URL
}

const baseCacheMax = 1024

// parseBase returns base parsed, or nil when it does not parse. The result
// must not be changed.
func parseBase(base string) *url.URL {
	bases.mu.Lock()
	u, ok := bases.m[base]
	bases.mu.Unlock()
	if ok {
		return u
	}
	u, err := url.Parse(base)
	if err != nil {
		u = nil
	}
	bases.mu.Lock()
	if bases.m == nil || len(bases.m) >= baseCacheMax {
		bases.m = make(map[string]*url.URL)
	}
	bases.m[base] = u
	bases.mu.Unlock()
	return u
}

func pick(svc, def time.Duration) time.Duration {
	if svc > 0 {
		return svc
	}
	return def
}

// reject answers with err before anything was forwarded: as it is when
// it is an *Error, the answer of a stop when the request was stopped
// meanwhile, else 500 internal_error.
func (h *Handler) reject(w http.ResponseWriter, st *Record, err error) {
	e, ok := answerOf(err)
	if !ok {
		e = stopCause(&st.ctx)
	}
	if e != nil {
		st.res.Code = e.Code
		st.res.Err = err
		httpx.WriteError(w, e)
		return
	}
	st.res.Code = httpx.CodeInternal
	st.res.Err = err
	h.logger().Error("proxy: authorize failed", "service", st.res.Service, "error", err)
	httpx.WriteError(w, err)
}

func (h *Handler) rewrite(pr *httputil.ProxyRequest) {
	st := RecordOf(pr.In.Context())
	out := pr.Out
	out.URL = st.target
	out.Host = ""
	stripInbound(out.Header)
	stripTokenHeaders(out.Header, st.tokenSet)
	// Answers come back unencoded, so that the scrubber can read them.
	out.Header["Accept-Encoding"] = identity
	out.TransferEncoding = nil
	out.Trailer = nil
	// The Transport replays the body from the record.
	out.GetBody = nil
	switch {
	case !st.hasBody:
		out.Body, out.ContentLength = nil, 0
	default:
		out.Body, out.ContentLength = http.NoBody, int64(len(st.body))
	}
}

// identity is the Accept-Encoding of every forwarded request. It is shared:
// the Transport clones the header before changing it.
var identity = []string{"identity"}

// handlerTransport sends a Handler's requests through its Transport with
// the service the path named, filling the request's record.
type handlerTransport struct{ h *Handler }

func (t handlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	st := RecordOf(req.Context())
	return t.h.tr.roundTrip(req, t.h.Pool, st.res.Service, st)
}

func (h *Handler) modifyResponse(resp *http.Response) error {
	var st *Record
	if resp.Request != nil {
		st = RecordOf(resp.Request.Context())
	}
	if st != nil {
		st.upstream = resp.StatusCode
		if resp.StatusCode == http.StatusSwitchingProtocols {
			st.upgraded = resp.Body
			if st.wsToken && resp.Header.Get("Sec-WebSocket-Protocol") == "" {
				resp.Header.Set("Sec-WebSocket-Protocol", "token")
			}
		}
	}
	if h.ModifyResponse != nil {
		if err := h.ModifyResponse(resp); err != nil {
			return err
		}
	}
	if st != nil {
		wrapStream(resp, st)
	}
	return nil
}

// wrapStream wraps an upstream response body so that a stop or the idle
// timeout ends it as the response allows (see stopCause). An answer the
// Transport read into memory (to scrub it whole) cannot stall, whatever
// ModifyResponse wrapped it in: it is left as it is.
func wrapStream(resp *http.Response, st *Record) {
	if resp.Body == nil || resp.Body == http.NoBody || st.inMemory {
		return
	}
	ctx := resp.Request.Context()
	if rwc, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Body = &wsConn{rwc: rwc, ctx: ctx, st: st}
		return
	}
	st.stream = streamBody{rc: resp.Body, ctx: ctx, st: st, cancel: st.cancel, idle: st.idle,
		sse: isEventStream(resp.Header.Get("Content-Type"))}
	resp.Body = &st.stream
}

// errorHandler maps every error of a forwarded request to its answer.
func (h *Handler) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	st := RecordOf(r.Context())
	if st == nil {
		st = &Record{}
	}
	st.res.Err = err
	service := st.res.Service
	var nk *keypool.NoKeyError
	var ue *keypool.UnavailableError
	var e *httpx.Error
	switch {
	case errors.As(err, &nk):
		e = &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeNoKeyAvailable, RetryAfter: nk.RetryAfter,
			Message: fmt.Sprintf("no key available for service %q; retry after %d s", service, int64((nk.RetryAfter+time.Second-1)/time.Second))}
		if nk.Reason != "" {
			e.Message += " (" + nk.Reason + ")"
		}
	case errors.As(err, &ue):
		e = &httpx.Error{Status: http.StatusServiceUnavailable, Code: httpx.CodeUpstreamUnavailable, RetryAfter: ue.RetryAfter,
			Message: fmt.Sprintf("upstream of service %q unavailable; retry after %d s", service, int64((ue.RetryAfter+time.Second-1)/time.Second))}
		if ue.Reason != "" {
			e.Message += " (" + ue.Reason + ")"
		}
	case errors.Is(err, keypool.ErrUnknownService):
		e = httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service)
	case stopCause(r.Context()) != nil:
		// Stopped: the token was revoked, or the deadline passed.
		e = stopCause(r.Context())
	case r.Context().Err() != nil:
		// The client went away: nobody to answer.
		st.res.Code, st.gone = "canceled", true
		h.logger().Debug("proxy: client went away", "service", service, "key_id", st.res.KeyID, "attempts", st.res.Attempts)
		return
	case isTimeout(err):
		e = httpx.Errorf(http.StatusGatewayTimeout, httpx.CodeUpstreamTimeout, "upstream of service %q timed out", service)
	default:
		e = httpx.Errorf(http.StatusBadGateway, httpx.CodeUpstreamUnreachable, "upstream of service %q unreachable", service)
	}
	st.res.Code = e.Code
	h.logger().Warn("proxy: request failed", "service", service, "key_id", st.res.KeyID,
		"attempts", st.res.Attempts, "code", e.Code, "error", err.Error())
	if st.res.KeyID != "" {
		w.Header().Set(HeaderKeyID, st.res.KeyID)
	}
	httpx.WriteError(w, e)
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// parseTarget splits /v1/{service}/{rest} and rejects targets that could
// leave the service's base path.
func parseTarget(r *http.Request) (service, restRaw string, err error) {
	bad := func(msg string) (string, string, error) {
		return "", "", httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "%s", msg)
	}
	if r.Method == http.MethodConnect {
		return bad("CONNECT is not supported")
	}
	raw := r.RequestURI
	if raw == "" {
		raw = r.URL.RequestURI()
	}
	if !strings.HasPrefix(raw, "/") {
		return bad("the request target must be a path (origin-form)")
	}
	if hasControl(raw) {
		return bad("the request target holds a control character")
	}
	p, _, _ := strings.Cut(raw, "?")
	const prefix = "/v1/"
	if !strings.HasPrefix(p, prefix) {
		return "", "", httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "no such route; use /v1/{service}/...")
	}
	if msg := checkPath(p); msg != "" {
		return bad(msg)
	}
	service, _, _ = strings.Cut(p[len(prefix):], "/")
	if service == "" || strings.IndexByte(service, '%') >= 0 {
		return "", "", httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service)
	}
	return service, p[len(prefix)+len(service):], nil // "" or "/…"
}

// checkPath returns why an escaped path is unsafe to forward, or "". It
// looks at the path as sent and decoded up to twice more, so
// double-encoded tricks are caught too.
func checkPath(p string) string {
	s := p
	for range 3 {
		if strings.IndexByte(s, '\\') >= 0 {
			return "backslashes are not allowed in the path"
		}
		if hasControl(s) {
			return "the path holds a control character"
		}
		if msg := checkSegments(s); msg != "" {
			return msg
		}
		for i := 0; i+2 < len(s); i++ {
			if s[i] == '%' {
				if c, ok := unhex2(s[i+1], s[i+2]); ok && (c == '/' || c == '\\') {
					return "encoded slashes (%2f, %5c) are not allowed in the path"
				}
			}
		}
		dec, err := url.PathUnescape(s)
		if err != nil {
			return "the path has malformed percent-encoding"
		}
		if dec == s {
			break
		}
		s = dec
	}
	return ""
}

// checkSegments rejects dot segments and empty segments (a trailing slash
// is fine).
func checkSegments(s string) string {
	s = strings.TrimPrefix(s, "/")
	for s != "" {
		seg, rest, more := strings.Cut(s, "/")
		// A segment's ;parameters do not hide a dot segment from servers
		// that strip them (Tomcat, Spring: "..;x=y" is "..").
		name, _, _ := strings.Cut(seg, ";")
		switch {
		case name == "." || name == "..":
			return "dot segments (. and ..) are not allowed in the path"
		case seg == "" && more:
			return "empty path segments (//) are not allowed"
		}
		s = rest
	}
	return ""
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return true
		}
	}
	return false
}

func unhex2(a, b byte) (byte, bool) {
	x, ok1 := unhex(a)
	y, ok2 := unhex(b)
	return x<<4 | y, ok1 && ok2
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// targetURL is base's URL with restRaw appended to its path and rawQuery
// without inbound credentials (by name, and by value: any parameter that
// holds a spelling of token), made in u.
func targetURL(u *url.URL, base, restRaw, rawQuery string, token *patternSet) (*url.URL, error) {
	b := parseBase(base)
	if b == nil || b.Host == "" || (b.Scheme != "http" && b.Scheme != "https") {
		return nil, httpx.Errorf(http.StatusInternalServerError, httpx.CodeInternal, "the service's base URL is not valid")
	}
	*u = *b
	var err error
	raw := strings.TrimSuffix(b.EscapedPath(), "/") + restRaw
	if raw == "" {
		raw = "/"
	}
	if u.Path, err = url.PathUnescape(raw); err != nil {
		return nil, httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "the path has malformed percent-encoding")
	}
	u.RawPath = raw
	u.RawQuery = stripCredentialParams(rawQuery, token)
	u.Fragment, u.RawFragment = "", ""
	return u, nil
}
