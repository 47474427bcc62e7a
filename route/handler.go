package route

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/breaker"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/store"
)

// HeaderService names the service that served a routed request (the
// key is in [proxy.HeaderKeyID]).
const HeaderService = "X-Keypool-Service"

// DefaultMaxAttempts is the number of targets a request may try when
// neither the router ([store.RouterSettings]) nor [Handler.MaxAttempts]
// says.
const DefaultMaxAttempts = 3

// DefaultBreaker is the breaker of a router's targets when neither the
// router nor [Handler.Breaker] says: 3 failures in a row open it for
// 10 s, growing by 10 s per trip in a row up to 5 minutes; one probe.
var DefaultBreaker = breaker.Settings{ConsecutiveFailures: 3, OpenTimeout: 10 * time.Second,
	MaxOpenTimeout: 5 * time.Minute, HalfOpenMaxRequests: 1}

// Attempt is one try of a routed request on one target, on the context
// of the request the [Handler] passes to Next.
type Attempt struct {
	// Router is the router service the client called.
	Router string
	// Model is the model the client named.
	Model string
	// Upstream is the model sent to the target (Model unless the target
	// renames it).
	Upstream string
	// Service is the target service.
	Service string
	// N counts the attempts of the request, from 1.
	N int
	// Caller is what [Handler.Authorize] returned for the request (the
	// caller's identity).
	Caller any
	// Info is what the body sent to the target says
	// ([meter.InspectRequest] of it; its Model is Upstream), so that the
	// proxy's hooks need not read the body again.
	Info meter.RequestInfo
}

type attemptKey struct{}

// attemptCtx is an attempt's context: its parent's, with the Attempt as
// a value. It is a [proxy.CredentialContext]: the proxy takes the
// credential the router read instead of reading the request again.
type attemptCtx struct {
	context.Context
	a    Attempt
	cred string
}

// Credential returns the client's credential, as the router read it.
func (c *attemptCtx) Credential() string { return c.cred }

// Value returns the Attempt for attemptKey, else the parent's value.
func (c *attemptCtx) Value(key any) any {
	if _, ok := key.(attemptKey); ok {
		return &c.a
	}
	return c.Context.Value(key)
}

// AttemptFrom returns the attempt a request is, or nil when it was not
// routed.
func AttemptFrom(ctx context.Context) *Attempt {
	a, _ := ctx.Value(attemptKey{}).(*Attempt)
	return a
}

// Handler serves /v1/{router}/v1/{rest} for router services: it reads
// the model the request body names, finds its route, and sends the
// request to the route's targets one after another as
// /v1/{service}{path}/{rest} through Next (keypoold's proxy, with each
// service's own pool, failover, limits, budgets and metering), with the
// body's model renamed when the target says so. A target is tried only
// while nothing has reached the client: an attempt answered 401, 403,
// 408, 429 or 5xx is dropped and the next target tried, within
// MaxAttempts and the request's deadline; any other answer (a 2xx, a
// stream, a 400 or 404 the request caused) goes to the client at once,
// and so does the last attempt's whatever it is. The answer carries
// [HeaderService].
//
// Health: a target whose service has no key available (Available) or
// whose recent attempts through the router failed with 5xx (a breaker
// per router and target service: its consecutive failures open it for
// its open period, then one probe) is skipped before a request is spent
// on it. When every target is
// skipped, the first one is tried anyway, so that the client gets its
// answer (429 no_key_available with Retry-After, say).
//
// Set the fields before the first request; a Handler must not be copied
// after first use. It is safe for concurrent use.
type Handler struct {
	// Next serves the attempts: /v1/{service}/… with the client's
	// credentials. Required.
	Next http.Handler
	// Authorize is called first, with the router's name and the client's
	// credential ([proxy.Credential]; "" when it sent none), to
	// authenticate the caller and check its access to the router and the
	// router's limits. It returns the caller's identity, handed to
	// AllowModel and to every attempt ([Attempt.Caller]), or an error,
	// written as [httpx.WriteError] does. Required.
	Authorize func(r *http.Request, router, credential string) (caller any, err error)
	// AllowModel, if set, checks the model the client named against the
	// allow-lists that apply (the router's, the caller's); an error is
	// written as Authorize's are.
	AllowModel func(r *http.Request, router, model string, caller any) error
	// Available, if set, reports whether a service has a key available
	// now (keypool.Pool.Available).
	Available func(service string) bool
	// MaxBodyBytes caps request bodies; zero means
	// proxy.DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// MaxAttempts caps the targets one request tries, for routers whose
	// settings do not ([store.RouterSettings.MaxAttempts]). If zero,
	// [DefaultMaxAttempts].
	MaxAttempts int
	// Timeout bounds a routed request's fallbacks: a later attempt gets
	// what is left of it since the request began (the first runs under
	// its target's own deadline). If zero, only each attempt's own
	// deadline applies.
	Timeout time.Duration
	// Breaker configures the breakers of routers whose settings do not
	// (each field of a router's [store.RouterSettings] overrides its
	// own). If zero, [DefaultBreaker].
	Breaker breaker.Settings
	// Logger receives fallbacks at debug level. If nil, slog.Default().
	Logger *slog.Logger
	// now is the clock of the breakers; nil means time.Now.
	now func() time.Time

	mu     sync.Mutex // serializes SetRouters
	tables atomic.Pointer[map[string]*Table]
}

// SetRouters replaces the routers the Handler serves (router name →
// table). Each router gets a breaker per target service; one whose
// router, service and settings are unchanged keeps its state.
func (h *Handler) SetRouters(m map[string]*Table) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var old map[string]*Table
	if p := h.tables.Load(); p != nil {
		old = *p
	}
	out := make(map[string]*Table, len(m))
	for name, t := range m {
		nt := *t
		bs := h.breakerSettings(t.settings)
		kept := map[string]*breaker.Breaker{}
		if ot := old[name]; ot != nil {
			for i, svc := range ot.services {
				if b := ot.breakers[i]; b.Settings() == bs {
					kept[svc] = b
				}
			}
		}
		nt.breakers = make([]*breaker.Breaker, len(t.services))
		for i, svc := range t.services {
			b := kept[svc]
			if b == nil {
				var err error
				if b, err = breaker.New(bs); err != nil {
					b, _ = breaker.New(DefaultBreaker)
				}
			}
			nt.breakers[i] = b
		}
		out[name] = &nt
	}
	h.tables.Store(&out)
}

// breakerSettings returns the breaker settings of a router: its own
// fields, else the Handler's Breaker, else [DefaultBreaker].
func (h *Handler) breakerSettings(rs store.RouterSettings) breaker.Settings {
	s := h.Breaker
	if s == (breaker.Settings{}) {
		s = DefaultBreaker
	}
	if rs.BreakerFailures > 0 {
		s.ConsecutiveFailures = uint32(rs.BreakerFailures)
	}
	if rs.BreakerOpenSeconds > 0 {
		s.OpenTimeout = time.Duration(rs.BreakerOpenSeconds) * time.Second
		if rs.BreakerMaxOpenSeconds == 0 {
			s.MaxOpenTimeout = max(s.MaxOpenTimeout, s.OpenTimeout)
		}
	}
	if rs.BreakerMaxOpenSeconds > 0 {
		s.MaxOpenTimeout = time.Duration(rs.BreakerMaxOpenSeconds) * time.Second
	}
	if s.HalfOpenMaxRequests == 0 {
		s.HalfOpenMaxRequests = 1
	}
	if b, err := breaker.New(s); err == nil {
		s = b.Settings() // with the breaker's own defaults, as Settings compares
	}
	return s
}

// maxAttempts returns the attempt budget of a router's requests.
func (h *Handler) maxAttempts(t *Table) int {
	switch {
	case t.settings.MaxAttempts > 0:
		return t.settings.MaxAttempts
	case h.MaxAttempts > 0:
		return h.MaxAttempts
	}
	return DefaultMaxAttempts
}

// Router returns the table of a router, if name is one.
func (h *Handler) Router(name string) (*Table, bool) {
	if m := h.tables.Load(); m != nil {
		t, ok := (*m)[name]
		return t, ok
	}
	return nil, false
}

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}

func (h *Handler) clock() time.Time {
	if h.now != nil {
		return h.now()
	}
	return time.Now()
}

// ServeHTTP serves a request to the router named in its path,
// /v1/{router}/….
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	router, _, _ := splitURI(r)
	table, ok := h.Router(router)
	if !ok {
		httpx.WriteError(w, httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", router))
		return
	}
	h.Serve(w, r, table)
}

// splitURI splits a request's URI, /v1/{router}/{rest}?{query}.
func splitURI(r *http.Request) (router, rest, query string) {
	raw := r.RequestURI
	if raw == "" {
		raw = r.URL.RequestURI()
	}
	p, query, _ := strings.Cut(raw, "?")
	router, rest, _ = strings.Cut(strings.TrimPrefix(p, "/v1/"), "/")
	return router, rest, query
}

// Serve serves a request to the router named in its path,
// /v1/{router}/…, whose table the caller got from [Handler.Router] (as
// ServeHTTP does, which a caller that has looked it up already need not
// repeat).
func (h *Handler) Serve(w http.ResponseWriter, r *http.Request, table *Table) {
	router, rest, query := splitURI(r)
	cred, err := proxy.Credential(r)
	if err != nil {
		httpx.WriteError(w, err)
		return
	}
	caller, err := h.Authorize(r, router, cred)
	if err != nil {
		httpx.WriteError(w, err)
		return
	}
	tail, ok := strings.CutPrefix(rest, "v1/") // "/"+rest under "/v1/"
	if !ok {
		httpx.WriteError(w, httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound,
			"router %q serves the OpenAI API under /v1/%s/v1/ (point the SDK's base URL there)", router, router))
		return
	}
	body, _, err := proxy.ReadBody(w, r, h.MaxBodyBytes)
	if err != nil {
		httpx.WriteError(w, err)
		return
	}
	info := meter.InspectRequest(body)
	switch {
	case info.ModelAmbiguous:
		httpx.WriteError(w, httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "the request names its model ambiguously"))
		return
	case info.Model == "":
		httpx.WriteError(w, httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
			"router %q routes by model: the JSON body must name a \"model\"", router))
		return
	}
	model := info.Model
	if h.AllowModel != nil {
		if err := h.AllowModel(r, router, model, caller); err != nil {
			httpx.WriteError(w, err)
			return
		}
	}
	rt := table.lookup(model)
	if rt == nil {
		httpx.WriteError(w, httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "router %q has no route for model %q", router, model))
		return
	}
	h.dispatch(w, r, &attemptCtx{a: Attempt{Router: router, Model: model, Caller: caller, Info: info}, cred: cred},
		table, rt, tail, query, body)
}

// attempt is what one attempt needs besides the inner path, in one
// allocation: its context, the request Next gets (a copy of the
// client's), its URL and body, the held writer and the
// proxy.ResponseWriter around it (so that the proxy does not wrap it
// again). Each attempt has its own: nothing of an attempt is reused.
type attempt struct {
	ctx  attemptCtx
	req  http.Request
	url  url.URL
	body proxy.BufferedBody
	hw   heldWriter
	rw   proxy.ResponseWriter
}

// dispatch tries the route's targets in order until one serves. The
// first attempt runs under its own deadline (the target's); a fallback
// runs under what is left of Timeout, counted from the start. base holds
// the request's Attempt (Router, Model, Caller, Info) and credential.
func (h *Handler) dispatch(w http.ResponseWriter, r *http.Request, base *attemptCtx, table *Table, rt *compiled, tail, query string, body []byte) {
	router, model := base.a.Router, base.a.Model
	var buf [MaxTargets]int
	order := h.order(table, rt, buf[:0])
	if max := h.maxAttempts(table); len(order) > max {
		order = order[:max]
	}
	var start time.Time
	if len(order) > 1 && h.Timeout > 0 {
		start = h.clock()
	}
	ctx := r.Context()
	for n, i := range order {
		tg := rt.targets[i]
		final := n == len(order)-1
		upstream, info := model, base.a.Info
		b := body
		if tg.Model != "" && tg.Model != model {
			upstream = tg.Model
			b, _ = meter.SetModel(body, upstream)
			info = meter.InspectRequest(b)
		}
		inner := rt.prefixes[i] + tail
		path := inner
		if strings.IndexByte(tail, '%') >= 0 { // prefixes have no escapes
			var err error
			if path, err = url.PathUnescape(inner); err != nil {
				httpx.WriteError(w, httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "the path has malformed percent-encoding"))
				return
			}
		}
		if n > 0 && h.Timeout > 0 {
			left := h.Timeout - h.clock().Sub(start)
			if left <= 0 {
				httpx.WriteError(w, errDeadline(router, h.Timeout))
				return
			}
			c, cancel := context.WithTimeoutCause(ctx, left, errDeadline(router, h.Timeout))
			defer cancel()
			ctx = c
		}
		at := new(attempt)
		at.ctx = *base
		at.ctx.Context = ctx
		at.ctx.a.Upstream, at.ctx.a.Service, at.ctx.a.N, at.ctx.a.Info = upstream, tg.Service, n+1, info
		// WithContext's copy stays on the stack: the attempt holds it.
		at.req = *r.WithContext(&at.ctx)
		ar := &at.req
		at.url = url.URL{Path: path, RawPath: inner, RawQuery: query}
		ar.URL = &at.url
		ar.RequestURI = inner
		if query != "" {
			ar.RequestURI += "?" + query
		}
		at.body.Reset(b)
		ar.Body, ar.ContentLength = &at.body, int64(len(b))
		ar.GetBody = nil
		hw := &at.hw
		hw.reset(w, rt.names[i], final)
		at.rw = proxy.ResponseWriter{ResponseWriter: hw}
		h.Next.ServeHTTP(&at.rw, ar)
		h.learn(table.breaker(rt, i), hw.status)
		if hw.committed || hw.status == 0 {
			// Served (or the client went away: nothing to answer).
			return
		}
		if ctx.Err() != nil {
			if e := stopCause(ctx); e != nil {
				httpx.WriteError(w, e)
			}
			return
		}
		h.logger().Debug("route: target could not serve; trying the next", "router", router, "model", model,
			"service", tg.Service, "status", hw.status, "attempt", n+1)
	}
}

// errDeadline is the answer of a routed request out of time.
func errDeadline(router string, d time.Duration) *httpx.Error {
	return httpx.Errorf(http.StatusGatewayTimeout, httpx.CodeUpstreamTimeout,
		"the request to router %q did not finish within its %s deadline", router, d)
}

// stopCause returns the *httpx.Error a context was ended with, if any.
func stopCause(ctx context.Context) *httpx.Error {
	var e *httpx.Error
	if errors.As(context.Cause(ctx), &e) {
		return e
	}
	return nil
}

// learn feeds an attempt's status to its target's breaker: 5xx are
// failures, 1xx–3xx successes; 4xx (the request's, or no key: the pool
// says so itself) and no status (the client went away) are neither.
func (h *Handler) learn(b *breaker.Breaker, status int) {
	switch {
	case b == nil || status == 0 || (status >= 400 && status < 500):
	case status >= 500:
		b.Failure(h.clock())
	default:
		b.Success()
	}
}

// order returns the indexes of the route's targets in the order to try
// them: the weighted targets by a weighted draw without replacement, then
// the others as given; targets whose service has no key available or
// whose breaker is open are left out, unless every target is, in which
// case the first in that order alone is returned.
func (h *Handler) order(t *Table, rt *compiled, out []int) []int {
	n := len(rt.targets)
	if n == 1 {
		return append(out, 0) // nothing to choose: the target answers
	}
	if rt.weighted > 1 {
		total := rt.total
		var taken uint32
		for range rt.weighted {
			x := rand.IntN(total)
			for i := range rt.weighted {
				if taken&(1<<i) != 0 {
					continue
				}
				if x < rt.targets[i].Weight {
					out = append(out, i)
					taken |= 1 << i
					total -= rt.targets[i].Weight
					break
				}
				x -= rt.targets[i].Weight
			}
		}
		for i := rt.weighted; i < n; i++ {
			out = append(out, i)
		}
	} else {
		for i := range n {
			out = append(out, i)
		}
	}
	now := h.clock()
	first := out[0]
	healthy := out[:0]
	for _, i := range out {
		svc := rt.targets[i].Service
		if h.Available != nil && !h.Available(svc) {
			continue
		}
		if b := t.breaker(rt, i); b != nil && !b.Ready(now) {
			continue
		}
		healthy = append(healthy, i)
	}
	if len(healthy) == 0 {
		return append(healthy, first)
	}
	return healthy
}
