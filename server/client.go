package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
)

// call is what the server knows about one authorized proxied request. It
// rides on the request's context from Authorize to OnDone; the metering
// callback (which may run on another goroutine, at the body's EOF) fills
// usage before OnDone reads it, because ReverseProxy closes the body
// before ServeHTTP returns.
type call struct {
	principal *auth.Principal
	open      *openCall // in Server.open until OnDone
	service   string
	// router is the router the request came through ("" for a direct
	// call): the caller's allow-lists were checked on the model it named,
	// and the router's budgets apply too. routerMeta is its metadata.
	router     string
	routerMeta *svcMeta
	// meta is the service's metadata, as authorize found it.
	meta *svcMeta
	// attempt is the router's attempt a routed request is (nil for a
	// direct call): its Info is what the body says.
	attempt *route.Attempt
	usage   meter.Usage
	metered bool
	// rec is the request's usage record from the upstream's answer on:
	// provisional (journaled with the estimate) until OnDone completes it.
	rec  store.UsageRecord
	prov bool

	// Set by prepare, for metered requests.
	family  meter.Family
	guessed bool // family openai assumed (see prepare): the answer's shape confirms it
	model   string
	strip   bool // include_usage was added: hide the usage chunk
	prices  *meter.PriceTable
	// budget is what the request holds on its budgets until it
	// settles; its Warning is the HeaderBudgetWarning value.
	budget budget.Holds

	// The admission estimate: input and output tokens, and cost. A
	// request that reached an upstream key but did not end with its
	// usage is charged at least this (see chargedUsage).
	estIn, estOut int64
	estCost       float64
}

// callFrom returns the call of the proxied request ctx belongs to: the
// proxy's record holds it (Data) from authorize on.
func callFrom(ctx context.Context) *call {
	if rec := proxy.RecordOf(ctx); rec != nil {
		c, _ := rec.Data.(*call)
		return c
	}
	return nil
}

// authenticate turns a client credential into a principal, answering as
// the contract says: 401 invalid_token (and counting a failure for the
// address), 429 rate_limited for a bad credential from an address with
// too many failures, 503 when the token store cannot be read. A valid
// credential is always served, whatever its address's failures. The admin
// token is not a client token. adminOK reports whether the admin token is
// welcome (key leasing).
func (s *Server) authenticate(r *http.Request, cred string, adminOK bool) (*auth.Principal, error) {
	if cred == "" {
		return nil, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken,
			"missing token: send your keypool team token as the API key (Authorization: Bearer kp_...)")
	}
	if s.auth.IsAdmin(cred) {
		if adminOK {
			return &auth.Principal{Admin: true}, nil
		}
		return nil, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken,
			"the admin token cannot be used here; use a team token (POST /admin/tokens)")
	}
	p, err := s.auth.Authenticate(r.Context(), cred)
	var why string
	switch {
	case err == nil:
		return p, nil
	case errors.Is(err, auth.ErrExpired):
		why = "token expired"
	case errors.Is(err, auth.ErrInactive):
		why = "token revoked"
	case errors.Is(err, auth.ErrInvalidToken):
		why = "invalid token"
	}
	if why != "" {
		if d, slowed := s.fails.Failed(s.clients.of(r), s.now()); slowed {
			s.metrics.limiterRejections.WithLabelValues("auth_failures").Inc()
			return nil, &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeRateLimited, RetryAfter: d,
				Message: "too many requests with invalid credentials from this address; retry later"}
		}
		return nil, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "%s", why)
	}
	switch {
	case r.Context().Err() != nil:
		return nil, r.Context().Err()
	}
	s.log.Error("token lookup failed", "request_id", RequestID(r.Context()), "err", err)
	return nil, httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable, "token store unavailable; retry shortly")
}

// admit checks a principal's access to a service and its rpm limits:
// 403 forbidden for a service outside the team's allowed_services or switched
// off (is_active false, for the admin too), 429
// rate_limited with Retry-After when the token's, the team's or the
// service's rpm_limit is reached. The admin is not limited.
func (s *Server) admit(ctx context.Context, p *auth.Principal, service string) error {
	return s.admitTo(ctx, p, service, s.meta(service))
}

// admitTo is admit with the service's metadata at hand.
func (s *Server) admitTo(ctx context.Context, p *auth.Principal, service string, meta *svcMeta) error {
	if !p.Admin && !p.AllowsService(service) {
		return httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "team %q may not use service %q", p.Team.Name, service)
	}
	if meta.disabled {
		return httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "service %q is disabled", service)
	}
	if p.Admin {
		return nil
	}
	return s.allowRPM(ctx, []rpmCheck{
		{"token", p.Token.ID, p.Token.RPMLimit},
		{"team", p.Team.ID, p.Team.RPMLimit},
		{"service", service, meta.limits.RPMLimit},
	})
}

// admitTarget checks what a target service of a router asks of an
// attempt on it (meta is its metadata): that it is active and under its
// own rpm_limit (the caller's were checked by the router).
func (s *Server) admitTarget(ctx context.Context, service string, meta *svcMeta) error {
	if meta.disabled {
		return httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "service %q is disabled", service)
	}
	return s.allowRPM(ctx, []rpmCheck{{"service", service, meta.limits.RPMLimit}})
}

// rpmCheck is one rpm limit a request counts against: its counter is
// scope:id.
type rpmCheck struct {
	scope, id string
	rpm       int
}

// allowRPM counts a request against each limit in turn and refuses at the
// first one reached.
func (s *Server) allowRPM(ctx context.Context, checks []rpmCheck) error {
	now := s.now()
	for _, c := range checks {
		if c.rpm <= 0 {
			continue
		}
		d, err := s.limiter.Allow(ctx, c.scope+":"+c.id, c.rpm, now)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			s.log.Warn("rate limiter failed; admitting", "scope", c.scope, "err", err)
			continue
		}
		if !d.Allowed && d.Degraded {
			s.metrics.limiterRejections.WithLabelValues(c.scope).Inc()
			return errLimitsUnavailable("rate limits")
		}
		if !d.Allowed {
			s.metrics.limiterRejections.WithLabelValues(c.scope).Inc()
			ra := max(d.RetryAfter, time.Second)
			return &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeRateLimited, RetryAfter: ra,
				Message: fmt.Sprintf("rate limit reached: %s rpm_limit is %d per minute; retry after %d s", c.scope, c.rpm, int64((ra+time.Second-1)/time.Second))}
		}
	}
	return nil
}

// authorize is the proxy's Authorize hook.
func (s *Server) authorize(r *http.Request, service, cred string) (*http.Request, error) {
	if a := route.AttemptFrom(r.Context()); a != nil {
		if rc, ok := a.Caller.(*routedCaller); ok {
			return s.authorizeAttempt(r, service, rc, a)
		}
	}
	meta := s.meta(service)
	ri := infoFrom(r.Context())
	p, err := s.admitClient(r, ri, service, meta, cred)
	if err != nil {
		return nil, err
	}
	return s.openRequest(r, ri, p, service, meta, nil, nil), nil
}

// admitClient authenticates a client credential and admits it to a
// service (see admit; meta is the service's), noting who it is, or the
// refusal's code, for the access log in ri (the request's reqInfo, nil
// when it has none).
func (s *Server) admitClient(r *http.Request, ri *reqInfo, service string, meta *svcMeta, cred string) (*auth.Principal, error) {
	if ri != nil {
		ri.service = service
		ri.cred, ri.credKnown = cred, true
	}
	p, err := s.authenticate(r, cred, false)
	if err == nil {
		if ri != nil {
			ri.teamID, ri.tokenID = p.Team.ID, p.Token.ID
		}
		err = s.admitTo(r.Context(), p, service, meta)
	}
	if err != nil {
		var e *httpx.Error
		if ri != nil && errors.As(err, &e) {
			ri.code = e.Code
		}
		return nil, err
	}
	return p, nil
}

// openRequest registers an authorized request until OnDone, so that a
// revocation ends it (see openCalls), and hands its call to the proxy's
// record; ri is the request's reqInfo (nil when it has none), meta the
// service's, rc and a the router's caller and attempt of a routed attempt
// (nil for a direct call). The call and its openCall live in the
// request's reqInfo: no allocation of their own. A router's attempts on
// one request take them in turn (each attempt's OnDone has run before
// the next is authorized), each starting afresh. It returns nil: the
// request goes on as it is.
func (s *Server) openRequest(r *http.Request, ri *reqInfo, p *auth.Principal, service string, meta *svcMeta,
	rc *routedCaller, a *route.Attempt) *http.Request {
	rec := proxy.RecordOf(r.Context())
	if rec == nil {
		return nil // not served by a proxy.Handler: nothing to track
	}
	if ri == nil {
		ri = &reqInfo{} // served without observe
	}
	oc := &ri.open
	*oc = openCall{}
	oc.tokenID, oc.teamID, oc.service, oc.rec = p.Token.ID, p.Team.ID, service, rec
	if p.User != nil {
		oc.userID = p.User.ID
	}
	s.open.add(oc)
	c := &ri.call
	*c = call{}
	c.principal, c.service, c.open, c.meta = p, service, oc, meta
	if rc != nil {
		c.router, c.routerMeta, c.attempt = rc.router, rc.meta, a
	}
	rec.Data = c
	return nil
}

// onAttempt feeds the per-attempt metrics.
func (s *Server) onAttempt(a proxy.AttemptInfo) {
	m := s.metrics.service(a.Service)
	m.upstream.Observe(a.Latency.Seconds())
	if a.Retry {
		m.retries.Inc()
	}
}

// onSend is the transport's OnSend hook: before a request goes out to a
// key, it journals a provisional usage record (the key, the admission
// estimate, status 0 until the answer), so a crash while the upstream
// answers still leaves a record, charged the estimate as a cut stream is.
// The final record (same ID) supersedes it in OnDone.
func (s *Server) onSend(req *http.Request, keyID string) {
	c := callFrom(req.Context())
	if c == nil {
		return
	}
	r := &c.rec // fields set one by one: a retry keeps the record's ID and journal position
	r.Time, r.RequestID = s.now().UTC(), RequestID(req.Context())
	r.TeamID, r.TokenID, r.Service, r.KeyID, r.Model = c.principal.Team.ID, c.principal.Token.ID, c.service, keyID, c.model
	r.Router = c.router
	r.TokensIn, r.TokensOut, r.Cost, r.KeySpend = c.estIn, c.estOut, c.estCost, store.KeySpendByUnit
	if c.family == meter.FamilyNone || (c.model == "" && c.estIn == 0) {
		r.TokensIn, r.TokensOut, r.Cost = 0, 0, 0
	}
	c.prov = true
	s.usage.Provisional(r)
}

// modifyResponse sets the budget warning header and meters LLM token
// usage as the body streams past, for successful JSON and SSE answers of
// metered requests (see prepare), hiding the usage chunk keypool asked
// for on behalf of a client that did not.
func (s *Server) modifyResponse(resp *http.Response) error {
	if resp.Request == nil {
		return nil
	}
	c := callFrom(resp.Request.Context())
	if c == nil {
		return nil
	}
	if id := resp.Header.Get(proxy.HeaderKeyID); id != "" && c.open != nil {
		s.open.setKey(c.open, id)
	}
	if c.budget.Warning != "" {
		resp.Header.Set(HeaderBudgetWarning, c.budget.Warning)
	}
	if c.family == meter.FamilyNone || resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil
	}
	ct := resp.Header.Get("Content-Type")
	if !strings.Contains(strings.ToLower(ct), "json") && !meter.IsEventStream(ct) {
		return nil // audio, images: not metered
	}
	c.metered = true
	meter.WrapResponse(resp, meter.Options{Family: c.family, Model: c.model, ContentType: ct,
		StripUsageChunk: c.strip, CheckShape: c.guessed, OnDone: func(u meter.Usage) { c.usage = u }})
	return nil
}

// onProxyDone records metrics, access-log fields and a usage record for
// every proxied request that reached an upstream key.
func (s *Server) onProxyDone(r *http.Request, res proxy.Result) {
	svc := res.Service
	if _, ok := s.pool.Service(svc); !ok {
		// Keep label values bounded: a request refused before its service
		// was checked still names a client-chosen one.
		svc = "unknown"
	}
	s.metrics.request(svc, res.Status, res.Code)
	if res.KeyID != "" {
		s.metrics.service(svc).duration.Observe(res.Duration.Seconds())
	}
	c := callFrom(r.Context())
	if ri := infoFrom(r.Context()); ri != nil {
		ri.service, ri.keyID = res.Service, res.KeyID
		if c != nil && c.router != "" {
			ri.model = c.model
		}
		if res.Code != "" {
			ri.code = res.Code
		}
		if res.Attempts > 1 {
			ri.retries = res.Attempts - 1
		}
	}
	if c == nil {
		return
	}
	if c.open != nil {
		s.open.remove(c.open)
	}
	now := s.now()
	u, cost := chargedUsage(c, res)
	tokens := float64(max(u.InputTokens, 0) + max(u.OutputTokens, 0))
	s.settle(c, tokens, cost, now)
	if res.KeyID == "" && c.prov {
		res.KeyID = c.rec.KeyID // an answer arrived: its provisional record is completed
	}
	if res.KeyID == "" {
		return
	}
	if u.Found {
		m := s.metrics.service(svc)
		m.tokensIn.Add(float64(max(u.InputTokens, 0)))
		m.tokensOut.Add(float64(max(u.OutputTokens, 0)))
		m.cost.Add(cost)
	}
	spent := s.keys.Charge(res.Service, res.KeyID, res.BalanceUnit, res.Status, tokens, cost)
	// Complete the provisional record (same ID) or start a new one; every
	// field is set here.
	rec := c.rec
	rec.KeySpend = spent
	rec.Time = now.UTC()
	rec.RequestID = RequestID(r.Context())
	rec.TeamID, rec.TokenID = c.principal.Team.ID, c.principal.Token.ID
	rec.Service, rec.Router, rec.KeyID, rec.Status = res.Service, c.router, res.KeyID, res.Status
	rec.LatencyMS = res.Duration.Milliseconds()
	rec.Model = c.model
	rec.TokensIn, rec.TokensOut, rec.CachedTokens, rec.Cost = 0, 0, 0, 0
	if u.Found {
		if u.Model != "" {
			rec.Model = u.Model
		}
		rec.TokensIn, rec.TokensOut, rec.CachedTokens, rec.Cost = u.InputTokens, u.OutputTokens, u.CachedTokens, cost
	}
	s.usage.Add(rec)
}

// bearer returns the credential of an Authorization: Bearer header (the
// lease endpoints take only that, or any place the proxy accepts).
func bearer(r *http.Request) string {
	v := r.Header.Get("Authorization")
	if len(v) > 7 && strings.EqualFold(v[:7], "bearer ") {
		return strings.TrimSpace(v[7:])
	}
	return ""
}
