package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool"
)

// HeaderKeyID is the response header naming the key that served a request
// (its id, never its secret).
const HeaderKeyID = "X-Keypool-Key-Id"

// DefaultMaxBufferedBody is the request body size [Transport] buffers to be
// able to replay a body that has no GetBody, when MaxBufferedBody is zero.
const DefaultMaxBufferedBody = 32 << 20

// drainLimit bounds how much of a failed response body is read (so the
// connection can be reused) before it is closed ahead of a retry.
const drainLimit = 64 << 10

// Transport is an [http.RoundTripper] that sends each request with a key
// from a [keypool.Pool] and fails over to another key when one is
// rate-limited, revoked, out of quota or failing.
//
// For each request it:
//
//   - picks a key with [keypool.Pool.Acquire], passing the affinity and
//     feature set on the request's context ([WithAffinity], [WithFeature])
//     and excluding the keys this request already tried;
//   - sends a copy of the request (the caller's request is never
//     modified) with the key injected by the service's
//     [keypool.AuthScheme] and the service's Headers set, replacing
//     headers of the same name;
//   - classifies the answer with Classifier and, on RateLimited, Invalid,
//     Exhausted, Failure or a first Refused, drains and closes the answer
//     and retries on another key while the body can be replayed, the
//     attempt budget allows (see MaxAttempts) and the request's context
//     is live; each key is tried at most once per request;
//   - releases the lease exactly once: for a served request when its
//     response body reaches EOF or is closed (so in-flight counts and
//     latency cover streams), otherwise as soon as the answer is known.
//
// Which requests get a key. A request whose URL has no host (for example
// http.NewRequest("GET", "/v1/models", nil)) is resolved against the
// service's BaseURL, base path included. A request to the BaseURL's origin
// (same scheme and host, default ports ignored) is sent as it is, with a
// key. A request to any other origin is passed to Base untouched, without
// a key and without a lease: this is what happens when an [http.Client]
// follows an upstream's redirect to another host. net/http strips
// Authorization on such redirects but not custom headers such as
// x-api-key, and a query-parameter key would ride in the URL; since the
// key is only ever set on the Transport's private copy of a request and
// never on a foreign origin, no redirect can carry it away. The Transport
// itself never follows redirects.
//
// Ambiguous refusals ([keypool.Refused]: a bare 403) are judged across
// keys. The first one is released without penalty and the request moves
// to another key. If a second key refuses it too, the refusal is the
// request's: that answer is returned and no key is penalised. If a later
// key serves the request, the first key gets one strike
// ([keypool.Pool.Report] with Refused); strikes from distinct requests
// confirm a key invalid (Service.ConfirmRefusals). So no request moves
// more than one key on ambiguous evidence.
//
// When no other key can take a retry, the last upstream answer is returned
// as it is (the caller sees the upstream's own 429, 401 or 5xx). Only when
// no key at all can be acquired for the first attempt does RoundTrip
// return an error: the *[keypool.NoKeyError] from the pool, which says when
// to come back (or an error wrapping [keypool.ErrUnknownService]).
//
// Every response carries [HeaderKeyID]. Every spelling of the key's secret
// (see the package documentation) is replaced by "[redacted]" in the
// response's headers, body and trailers, whatever the status: a body of
// known length up to 64 KiB is scrubbed in memory (Content-Length
// corrected), any other as it streams (Content-Length dropped; only the
// bytes that could begin a secret are held back between reads). resp.Request
// is the caller's request, not the copy that carried the key. Errors never
// contain the secret: a *url.Error's URL, which holds a query-parameter
// key, is redacted.
//
// A request canceled by its caller, or whose context's deadline passes,
// releases its key with [keypool.Canceled], which does not count against
// the key: a caller's short deadline says nothing about the key. Set
// AttemptTimeout to fail over from keys that answer too slowly.
//
// The Transport holds no per-request state; its fields must not change
// while it is in use. It is safe for concurrent use.
type Transport struct {
	// Pool supplies the keys. Required.
	Pool *keypool.Pool
	// Service names the pool's service whose keys are used. A request's
	// context may override it with [WithService].
	Service string
	// Base sends the requests. If nil, [http.DefaultTransport].
	Base http.RoundTripper
	// Classifier decides what an answer says about the key, for services
	// whose [keypool.Service.Classifier] is nil. If nil,
	// [keypool.Classify] at the pool's clock ([keypool.Pool.Now]).
	Classifier keypool.Classifier
	// MaxAttempts bounds the attempts a request may spend on ambiguous
	// failures ([keypool.Failure]: 5xx, timeouts, resets). If zero, 3;
	// negative means 1. Refusals that are about the key (RateLimited,
	// Invalid, Exhausted: 429, 401 or an invalid-key code, 402 or a quota
	// code) do not spend it: they are bounded by the service's key count
	// and the request's context, since each key is tried at most once per
	// request. A 429 still cools the key that gave it. A request whose
	// body cannot be replayed makes one attempt.
	MaxAttempts int
	// MaxBufferedBody is how much of a request body without GetBody is
	// read into memory so that it can be replayed on another key. If
	// zero, [DefaultMaxBufferedBody] (32 MiB); negative disables
	// buffering. A body over the limit is streamed to the upstream in a
	// single attempt, without retries. Bodies with GetBody (those made by
	// http.NewRequest from a bytes.Reader, bytes.Buffer or strings.Reader)
	// are never buffered.
	MaxBufferedBody int64
	// AttemptTimeout, if positive, bounds how long one attempt may wait for
	// the upstream's response headers; an attempt that runs out counts as
	// a Failure of its key and is retried on another. It does not bound
	// reading the body. A service's HeaderTimeout overrides it. If zero
	// (and the service sets none), only the request's context bounds an
	// attempt.
	AttemptTimeout time.Duration
	// OnAttempt, if set, is called after each attempt with what happened
	// (for metrics). It must be fast and must not retain the error past
	// the call unless it only prints it (it is redacted).
	OnAttempt func(AttemptInfo)
	// OnSend, if set, is called just before each attempt is sent, with the
	// request RoundTrip was given and the id of the key it goes out with
	// (keypoold journals a provisional usage record there, so a crash
	// while the upstream answers still leaves one). It must be fast.
	OnSend func(req *http.Request, keyID string)
}

// AttemptInfo describes one attempt of a request on one key.
type AttemptInfo struct {
	// Service is the pool's service.
	Service string
	// KeyID is the key that was tried.
	KeyID string
	// Attempt counts from 1.
	Attempt int
	// Status is the upstream's status code; zero when Err is set.
	Status int
	// Outcome is how the answer was classified.
	Outcome keypool.Outcome
	// Latency is the time from sending the request to its response
	// headers (or the error).
	Latency time.Duration
	// Retry reports whether another key will be tried (if one is
	// available).
	Retry bool
	// Err is the transport error, redacted; nil when the upstream answered.
	Err error
}

type ctxKey int

const (
	serviceKey ctxKey = iota
	affinityKey
	featureKey
)

// WithService returns a context under which a [Transport] uses the named
// service instead of its Service field.
func WithService(ctx context.Context, service string) context.Context {
	return context.WithValue(ctx, serviceKey, service)
}

// WithAffinity returns a context under which a [Transport] asks the pool
// for the key that serves affinity ([keypool.Request.Affinity]), for
// example a user or session id with the sticky selector.
func WithAffinity(ctx context.Context, affinity string) context.Context {
	return context.WithValue(ctx, affinityKey, affinity)
}

// WithFeature returns a context under which a [Transport] picks only keys
// that serve feature ([keypool.Request.Feature]).
func WithFeature(ctx context.Context, feature string) context.Context {
	return context.WithValue(ctx, featureKey, feature)
}

func ctxString(ctx context.Context, k ctxKey) string {
	s, _ := ctx.Value(k).(string)
	return s
}

// errAttemptTimeout is the cancel cause of an attempt that ran out of
// AttemptTimeout.
var errAttemptTimeout = errors.New("attempt timeout")

// attemptTimeoutError is returned for an attempt that ran out of
// AttemptTimeout.
type attemptTimeoutError struct{ d time.Duration }

func (e *attemptTimeoutError) Error() string {
	return fmt.Sprintf("proxy: upstream sent no response headers within %s", e.d)
}
func (e *attemptTimeoutError) Timeout() bool   { return true }
func (e *attemptTimeoutError) Temporary() bool { return true }

// RoundTrip sends req with a pooled key; see [Transport].
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	service := t.Service
	if s := ctxString(req.Context(), serviceKey); s != "" {
		service = s
	}
	return t.roundTrip(req, t.Pool, service, nil)
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

func closeReqBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}

// replay yields the request body for each attempt.
type replay struct {
	req      *http.Request
	buf      []byte        // buffered body, when the request had no GetBody
	once     io.ReadCloser // the one-shot body when it could not be buffered
	buffered bool
	rec      *Record // the Handler's record the body comes from, if any
}

func (rp *replay) body(attempt int) (io.ReadCloser, error) {
	req := rp.req
	switch {
	case rp.once != nil:
		return rp.once, nil
	case rp.buffered:
		if len(rp.buf) == 0 {
			return http.NoBody, nil
		}
		b := &memBody{}
		if attempt == 1 && rp.rec != nil {
			// An attempt's body may still be read after its answer
			// came: only the first lives in the record.
			b = &rp.rec.body1
		}
		b.Reset(rp.buf)
		return b, nil
	case req.Body == nil || req.Body == http.NoBody:
		return req.Body, nil
	case attempt == 1:
		return req.Body, nil
	default:
		return req.GetBody()
	}
}

// prepareBody decides how the body is replayed and reports whether it can
// be. A Handler's request is replayed from the body its record holds.
func (t *Transport) prepareBody(rp *replay, req *http.Request, rec *Record) (bool, error) {
	rp.req = req
	if rec != nil && rec.hasBody {
		rp.buf, rp.buffered, rp.rec = rec.body, true, rec
		return true, nil
	}
	if req.Body == nil || req.Body == http.NoBody || req.GetBody != nil {
		return true, nil
	}
	limit := t.MaxBufferedBody
	if limit == 0 {
		limit = DefaultMaxBufferedBody
	}
	if limit < 0 {
		rp.once = req.Body
		return false, nil
	}
	var b bytes.Buffer
	if req.ContentLength > 0 && req.ContentLength <= limit {
		b.Grow(int(req.ContentLength))
	}
	_, err := b.ReadFrom(io.LimitReader(req.Body, limit+1))
	if err != nil {
		_ = req.Body.Close()
		return false, fmt.Errorf("proxy: reading request body: %w", err)
	}
	if int64(b.Len()) > limit {
		rp.once = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(b.Bytes()), req.Body), req.Body}
		return false, nil
	}
	_ = req.Body.Close()
	rp.buf, rp.buffered = b.Bytes(), true
	return true, nil
}

// attempts is one request's attempt budget and what awaits its fate.
type attempts struct {
	max     int    // ambiguous failures allowed
	failed  int    // ambiguous failures so far
	suspect string // key whose ambiguous refusal awaits the request's fate
	reason  string // the suspect's refusal

	// penalty is the key whose lasting refusal (see lasting) awaits the
	// request's fate, and penaltyOut that refusal.
	penalty    string
	penaltyOut keypool.Outcome
	// repeated is set when a second key refused the same request: the
	// refusal is the request's, and no key is penalised.
	repeated bool
	// ctx is the request's context: a client that went away before
	// another key was tried leaves a lasting refusal unconfirmed.
	ctx context.Context
}

// lasting reports whether o takes a key out of rotation until somebody
// says otherwise (invalid, or exhausted with no named reset). Such a
// refusal is applied only once the request's fate confirms it is about the
// key: another key served the request, or no other key could be tried.
// So no single request changes the lasting state of more than one key,
// and a refusal that follows the request (an endpoint that answers 401 to
// every key) penalises none.
func lasting(o keypool.Outcome) bool {
	return o.Kind == keypool.Invalid || (o.Kind == keypool.Exhausted && o.RetryAfter <= 0)
}

// next reports whether the request may try another key after an attempt
// with key id that ended with o, and records what it spent.
func (a *attempts) next(o keypool.Outcome, id string) bool {
	switch {
	case lasting(o):
		if a.penalty != "" || a.suspect != "" {
			a.repeated = true // repeated on a second key: the request's
			return false
		}
		a.penalty, a.penaltyOut = id, o
		return true
	case o.Kind == keypool.RateLimited, o.Kind == keypool.Exhausted:
		return true // about the key, and temporary: free, bounded by the key count
	case o.Kind == keypool.Failure:
		a.failed++
		return a.failed < a.max
	case o.Kind == keypool.Refused:
		if a.suspect != "" || a.penalty != "" {
			a.repeated = true
			return false
		}
		a.suspect, a.reason = id, o.Reason
		return true
	}
	return false
}

// settle applies what awaited the request's fate when the request ends:
// the pending lasting refusal, unless a second key refused the request
// too; and, when served is set (another key served the request), one
// strike for the suspect.
func (a *attempts) settle(pool *keypool.Pool, service string, served bool) {
	if a.repeated {
		return
	}
	if a.penalty != "" && !served && a.ctx != nil && a.ctx.Err() != nil {
		// The client went away before another key could be tried: the
		// refusal may be the request's as much as the key's.
		a.penalty = ""
	}
	if a.penalty != "" {
		pool.Report(service, a.penalty, a.penaltyOut)
		a.penalty = ""
	}
	if served && a.suspect != "" {
		// Another key served what the suspect refused: one strike.
		pool.Report(service, a.suspect, keypool.Outcome{Kind: keypool.Refused, Reason: a.reason})
	}
}

// roundTrip is RoundTrip on pool's service. rec, when a Handler forwards
// the request, is its record: the body is replayed from it, its idle
// timeout and team token apply, and each attempt's key is noted on it.
func (t *Transport) roundTrip(req *http.Request, pool *keypool.Pool, service string, rec *Record) (*http.Response, error) {
	if pool == nil {
		closeReqBody(req)
		return nil, errors.New("proxy: Transport has no Pool")
	}
	var svc *keypool.Service
	if rec != nil && rec.svc.Name == service {
		svc = &rec.svc // looked up once, by the Handler
	} else {
		s, ok := pool.Service(service)
		if !ok {
			closeReqBody(req)
			return nil, fmt.Errorf("%w: %q", keypool.ErrUnknownService, service)
		}
		svc = &s
	}
	var target *url.URL
	switch {
	case req.URL.Host == "":
		u, err := resolve(svc.BaseURL, req.URL)
		if err != nil {
			closeReqBody(req)
			return nil, err
		}
		target = u
	case sameOrigin(req.URL, svc.BaseURL):
		target = req.URL
	default:
		// Another origin (a redirect followed by http.Client): no key.
		return t.base().RoundTrip(req)
	}

	var rp replay
	canReplay, err := t.prepareBody(&rp, req, rec)
	if err != nil {
		return nil, err
	}
	budget := attempts{max: t.MaxAttempts, ctx: req.Context()}
	if budget.max == 0 {
		budget.max = 3
	} else if budget.max < 0 {
		budget.max = 1
	}

	attemptTimeout := t.AttemptTimeout
	if svc.HeaderTimeout > 0 {
		attemptTimeout = svc.HeaderTimeout
	}
	ctx := req.Context()
	idle := svc.IdleTimeout
	if rec != nil && rec.idle > 0 {
		idle = rec.idle
	}
	areq := keypool.Request{Affinity: ctxString(ctx, affinityKey), Feature: ctxString(ctx, featureKey)}
	var tried []string // allocated only when a retry happens
	var (
		lastResp   *http.Response
		lastSecret string
		lastErr    error
	)
	base := t.base()
	for attempt := 1; ; attempt++ {
		areq.Exclude = tried
		lease, err := pool.Acquire(service, areq)
		if err != nil {
			if attempt == 1 {
				if !rp.buffered {
					closeReqBody(req) // not sent: RoundTrip must close it
				}
				return nil, err
			}
			break
		}
		if lastResp != nil && !bufferBody(lastResp) {
			// Too large to keep while the next key is tried.
			lastResp = nil
		}
		lastErr = nil
		body, err := rp.body(attempt)
		if err != nil {
			lease.Release(keypool.Outcome{Kind: keypool.ClientError, Reason: "request body"})
			budget.settle(pool, service, false)
			return nil, fmt.Errorf("proxy: replaying request body: %w", err)
		}
		secret := lease.Secret().Reveal()
		actx := ctx
		var cancel context.CancelCauseFunc
		var timer *time.Timer
		if attemptTimeout > 0 {
			actx, cancel = context.WithCancelCause(ctx)
			if rec != nil {
				rec.armAttempt(attemptTimeout, cancel) // the record's one timer
			} else {
				timer = time.AfterFunc(attemptTimeout, func() { cancel(errAttemptTimeout) })
			}
		}
		var out *http.Request
		if attempt == 1 && rec != nil {
			out = &rec.out // an attempt's request may be read after its answer came: only the first lives in the record
		}
		out = outRequest(out, req, actx, target, body, svc, &lease)
		var start time.Time
		if t.OnAttempt != nil {
			start = time.Now()
		}
		if t.OnSend != nil {
			t.OnSend(req, lease.KeyID())
		}
		resp, err := base.RoundTrip(out)
		fired := false
		switch {
		case timer != nil:
			fired = !timer.Stop()
		case cancel != nil:
			fired = rec.disarmAttempt()
		}
		if fired && context.Cause(actx) == errAttemptTimeout && ctx.Err() == nil {
			// The attempt ran out of time, even if headers raced in.
			if resp != nil {
				drainClose(resp.Body)
				resp = nil
			}
			err = &attemptTimeoutError{attemptTimeout}
		}
		if err == nil && idle > 0 && resp.StatusCode >= 400 && resp.Body != nil && resp.Body != http.NoBody {
			// An error answer's body is read to classify it, kept while
			// another key is tried and scrubbed in memory: no read of it
			// may wait longer than the idle timeout.
			resp.Body = watchIdle(resp.Body, idle)
		}
		var outcome keypool.Outcome
		switch {
		case err != nil && ctx.Err() != nil:
			// The caller canceled or its own deadline passed: not the
			// key's fault (AttemptTimeout is how keys are timed out).
			outcome = keypool.Outcome{Kind: keypool.Canceled, Reason: "canceled"}
		case svc.Classifier != nil:
			outcome = svc.Classifier(resp, err)
		case t.Classifier != nil:
			outcome = t.Classifier(resp, err)
		case err == nil && resp.StatusCode < 400:
			outcome = keypool.Outcome{Kind: keypool.OK} // as Classify says, without reading the clock
		default:
			outcome = keypool.Classify(resp, err, pool.Now())
		}
		id := lease.KeyID()
		if rec != nil {
			rec.attempted(id, lease.Key().BalanceUnit, attempt)
		}
		retry := budget.next(outcome, id) && canReplay && ctx.Err() == nil
		release := outcome
		if outcome.Kind == keypool.Refused || (lasting(outcome) && (retry || budget.repeated)) {
			// Judged by the request's fate, not by this answer alone: the
			// key is released without penalty now, and penalised (struck,
			// for a Refused) later if another key serves the request.
			release = keypool.Outcome{Kind: keypool.ClientError, Reason: outcome.Reason}
		}
		if lasting(outcome) && !retry && !budget.repeated {
			budget.penalty = ""
			if ctx.Err() != nil {
				// The client went away, not because no other key could
				// serve: the refusal stays unconfirmed.
				release = keypool.Outcome{Kind: keypool.Canceled, Reason: outcome.Reason}
			}
			// Otherwise no other key will be tried: the answer stands
			// on its own.
		}
		if err != nil {
			err = redactError(err, secret)
		}
		if t.OnAttempt != nil {
			info := AttemptInfo{Service: service, KeyID: id, Attempt: attempt, Outcome: outcome, Latency: time.Since(start), Retry: retry, Err: err}
			if resp != nil {
				info.Status = resp.StatusCode
			}
			t.OnAttempt(info)
		}
		if err != nil {
			if cancel != nil {
				cancel(nil)
			}
			lease.Release(release)
			if retry {
				lastErr = err
				tried = append(tried, id)
				continue
			}
			budget.settle(pool, service, false)
			if lastResp != nil {
				// An earlier key's own answer (a 429 with its Retry-After,
				// say) tells the client more than this connection error.
				scrubBodyWith(lastResp, keyMatcher(lastSecret, rec), 0, nil, nil)
				return lastResp, nil
			}
			return nil, err
		}
		resp.Request = req
		if resp.Header == nil {
			resp.Header = http.Header{}
		}
		resp.Header.Set(HeaderKeyID, id)
		m := keyMatcher(secret, rec)
		scrubHeaderWith(resp.Header, &m)
		if outcome.Kind == keypool.OK {
			scrubBodyWith(resp, m, idle, rec, cancel)
			wrapBody(resp, lease, ctx, cancel, rec)
			budget.settle(pool, service, true)
			return resp, nil
		}
		if cancel != nil {
			// Error bodies are small; the attempt's context stays live
			// until the body is closed.
			resp.Body = cancelOnClose(resp.Body, cancel)
		}
		lease.Release(release)
		if retry {
			lastResp, lastSecret = resp, secret
			tried = append(tried, id)
			continue
		}
		budget.settle(pool, service, false)
		scrubBodyWith(resp, m, 0, nil, nil)
		return resp, nil
	}
	budget.settle(pool, service, false)
	if lastResp != nil {
		scrubBodyWith(lastResp, keyMatcher(lastSecret, rec), 0, nil, nil)
		return lastResp, nil
	}
	return nil, lastErr
}

// keptBodyLimit bounds the error body kept in memory while another key is
// tried, so the earlier answer can still be returned.
const keptBodyLimit = 64 << 10

// bufferBody replaces resp's body with an in-memory copy, reporting false
// (and closing the body) when it is larger than keptBodyLimit.
func bufferBody(resp *http.Response) bool {
	if _, ok := resp.Body.(keptBody); ok {
		return true
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, keptBodyLimit+1))
	drainClose(resp.Body)
	if err != nil || len(b) > keptBodyLimit {
		return false
	}
	resp.Body = keptBody{bytes.NewReader(b)}
	resp.ContentLength = int64(len(b))
	resp.Header.Set("Content-Length", strconv.Itoa(len(b)))
	resp.Header.Del("Transfer-Encoding")
	resp.TransferEncoding = nil
	return true
}

type keptBody struct{ *bytes.Reader }

func (keptBody) Close() error { return nil }

// outRequest returns the copy of req that is sent with the lease's key,
// on ctx (one shallow copy, made in out when it is not nil).
// out, when not nil, is where the copy is made.
func outRequest(out, req *http.Request, ctx context.Context, target *url.URL, body io.ReadCloser, svc *keypool.Service, lease *keypool.Lease) *http.Request {
	if out == nil {
		out = req.WithContext(ctx)
	} else {
		*out = *req.WithContext(ctx)
	}
	out.URL = target
	if target != req.URL {
		out.Host = ""
	}
	out.Body = body
	if body == http.NoBody {
		out.ContentLength = 0
	}
	out.Header = cloneHeader(req.Header, len(svc.Headers)+1)
	for k, v := range svc.Headers {
		out.Header.Set(k, v)
	}
	auth := svc.Auth
	if auth == nil {
		auth = keypool.Bearer
	}
	auth.Inject(out, lease.Secret())
	return out
}

// cloneHeader is http.Header.Clone with room for extra more keys, so that
// injecting the key does not grow the map.
func cloneHeader(h http.Header, extra int) http.Header {
	nv := 0
	for _, vv := range h {
		nv += len(vv)
	}
	sv := make([]string, nv)
	out := make(http.Header, len(h)+extra)
	for k, vv := range h {
		if vv == nil {
			out[k] = nil
			continue
		}
		n := copy(sv, vv)
		out[k] = sv[:n:n]
		sv = sv[n:]
	}
	return out
}

// resolve puts a host-less URL onto base: base's scheme and host, base's
// path followed by u's, u's query.
func resolve(base string, u *url.URL) (*url.URL, error) {
	b, err := url.Parse(base)
	if err != nil || b.Host == "" {
		return nil, fmt.Errorf("proxy: service base URL %q is not absolute", base)
	}
	out := *b
	p := u.EscapedPath()
	if p != "" && !strings.HasPrefix(p, "/") {
		p = "/" + p
	}
	raw := strings.TrimSuffix(b.EscapedPath(), "/") + p
	if raw == "" {
		raw = "/"
	}
	out.Path, err = url.PathUnescape(raw)
	if err != nil {
		return nil, fmt.Errorf("proxy: bad request path: %w", err)
	}
	out.RawPath = raw
	out.RawQuery = u.RawQuery
	out.Fragment = ""
	return &out, nil
}

// sameOrigin reports whether u has the scheme and host of the URL base.
// It does not allocate.
func sameOrigin(u *url.URL, base string) bool {
	scheme, rest, ok := strings.Cut(base, "://")
	if !ok || !strings.EqualFold(scheme, u.Scheme) {
		return false
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if i := strings.LastIndexByte(rest, '@'); i >= 0 {
		rest = rest[i+1:]
	}
	return strings.EqualFold(stripDefaultPort(rest, scheme), stripDefaultPort(u.Host, scheme))
}

func stripDefaultPort(host, scheme string) string {
	switch {
	case strings.EqualFold(scheme, "https") && strings.HasSuffix(host, ":443"):
		return host[:len(host)-4]
	case strings.EqualFold(scheme, "http") && strings.HasSuffix(host, ":80"):
		return host[:len(host)-3]
	}
	return host
}

// drainClose reads a bounded amount of a body, so its connection can be
// reused, and closes it.
func drainClose(b io.ReadCloser) {
	if b == nil {
		return
	}
	_, _ = io.CopyN(io.Discard, b, drainLimit)
	_ = b.Close()
}

// leaseBody releases its lease when the body reaches EOF, fails or is
// closed, whichever comes first.
type leaseBody struct {
	rc     io.ReadCloser
	ctx    context.Context
	cancel context.CancelCauseFunc
	done   atomic.Bool // the lease is released
	closed atomic.Bool // rc is closed
	lease  keypool.Lease
}

func (b *leaseBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err != nil {
		if err == io.EOF {
			b.release(keypool.Outcome{Kind: keypool.OK})
		} else if b.ctx.Err() != nil {
			b.release(keypool.Outcome{Kind: keypool.Canceled, Reason: "canceled"})
		} else {
			b.release(keypool.Outcome{Kind: keypool.Failure, Reason: "upstream body: " + errReason(err)})
		}
	}
	return n, err
}

func (b *leaseBody) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	err := b.rc.Close()
	if b.ctx.Err() != nil {
		b.release(keypool.Outcome{Kind: keypool.Canceled, Reason: "canceled"})
	} else {
		b.release(keypool.Outcome{Kind: keypool.OK})
	}
	return err
}

func (b *leaseBody) release(o keypool.Outcome) {
	if !b.done.CompareAndSwap(false, true) {
		return
	}
	b.lease.Release(o)
	if b.cancel != nil {
		b.cancel(nil)
	}
}

// leaseConn is a leaseBody over the read-write body of a 101 Switching
// Protocols response, which httputil.ReverseProxy needs to write to.
type leaseConn struct{ leaseBody }

func (c *leaseConn) Write(p []byte) (int, error) { return c.rc.(io.Writer).Write(p) }

// wrapBody makes resp's body release lease when it ends. The body of a
// Handler's request lives in its record (rec): no allocation of its own.
func wrapBody(resp *http.Response, lease keypool.Lease, ctx context.Context, cancel context.CancelCauseFunc, rec *Record) {
	if resp.Body == nil {
		resp.Body = http.NoBody
	}
	if _, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
		c := &leaseConn{}
		c.rc, c.ctx, c.cancel, c.lease = resp.Body, ctx, cancel, lease
		resp.Body = c
		return
	}
	if resp.Body == http.NoBody {
		// Nothing to stream: release now.
		l := lease
		l.Release(keypool.Outcome{Kind: keypool.OK})
		if cancel != nil {
			cancel(nil)
		}
		return
	}
	var b *leaseBody
	if rec != nil {
		b = &rec.lease
	} else {
		b = new(leaseBody)
	}
	b.rc, b.ctx, b.cancel, b.lease = resp.Body, ctx, cancel, lease
	resp.Body = b
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelCauseFunc
}

func (b cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel(nil)
	return err
}

func cancelOnClose(rc io.ReadCloser, cancel context.CancelCauseFunc) io.ReadCloser {
	if rc == nil {
		cancel(nil)
		return nil
	}
	return cancelBody{rc, cancel}
}

// errReason is a short, secret-free description of a body read error.
func errReason(err error) string {
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return "unexpected EOF"
	}
	return "read error"
}

var _ http.RoundTripper = (*Transport)(nil)
