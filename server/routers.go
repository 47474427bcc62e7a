package server

import (
	"errors"
	"net/http"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
)

// Routers. A service of kind "router" is served by a route.Handler in
// front of the proxy: the router authenticates the caller once, checks
// its access to the router, the router's rpm_limit with the token's and
// the team's, and the allow-lists (the router's models_enabled, the
// team's and the token's) on the model the client named; each attempt on
// a target then goes through the proxy as a request to the target
// service, where only the target's own checks apply (is_active, its
// rpm_limit, its models_enabled on the upstream model) and the budgets
// of the token, the team, the target and the router are reserved.

// initRoutes sets up the route handler in front of the proxy.
func (s *Server) initRoutes() {
	h := s.routes
	h.Next = s.proxy
	h.Authorize = s.authorizeRouter
	h.AllowModel = s.allowRouterModel
	h.Available = s.pool.Available
	h.MaxBodyBytes = s.cfg.MaxBodyBytes
	h.Timeout = time.Duration(s.cfg.UpstreamTimeout)
	h.Logger = s.log
}

// setRouters compiles the routes of every router service and hands them
// to the route handler. Routes are validated when written; a router
// whose routes no longer compile is logged and left out.
func (s *Server) setRouters(svcs []store.Service) {
	m := map[string]*route.Table{}
	for _, sv := range svcs {
		if sv.Kind != store.KindRouter {
			continue
		}
		t, err := route.CompileRouter(sv)
		if err != nil {
			s.log.Error("router routes do not compile; the router answers 404 until they are fixed", "service", sv.Name, "err", err)
			continue
		}
		m[sv.Name] = t
	}
	s.routes.SetRouters(m)
}

// routedCaller is the caller of a request to a router, as Authorize
// returns it (route.Attempt.Caller): the principal the router
// authenticated, and the router with its metadata, looked up once for
// the request. It lives in the request's reqInfo.
type routedCaller struct {
	p      *auth.Principal
	router string
	meta   *svcMeta
	ri     *reqInfo // the request's (nil when it has none): its attempts' too
}

// authorizeRouter is the route handler's Authorize hook: the caller's
// token, its team's access to the router, the router's is_active, and
// the rpm limits of the token, the team and the router. It returns a
// *routedCaller.
func (s *Server) authorizeRouter(r *http.Request, router, cred string) (any, error) {
	meta := s.meta(router)
	ri := infoFrom(r.Context())
	p, err := s.admitClient(r, ri, router, meta, cred)
	if err != nil {
		return nil, err
	}
	var rc *routedCaller
	if ri != nil {
		rc = &ri.routed
	} else {
		rc = new(routedCaller)
	}
	*rc = routedCaller{p: p, router: router, meta: meta, ri: ri}
	return rc, nil
}

// allowRouterModel is the route handler's AllowModel hook: the model the
// client named must be on the router's models_enabled and the caller's
// team's and token's, when they have one.
func (s *Server) allowRouterModel(r *http.Request, router, model string, caller any) error {
	rc, _ := caller.(*routedCaller)
	if rc == nil || modelAllowed(rc.meta, rc.p, model) {
		return nil
	}
	err := httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "model %q is not enabled for this router, team or token", model)
	if ri := infoFrom(r.Context()); ri != nil {
		ri.code = err.Code
	}
	return err
}

// authorizeAttempt is the proxy's Authorize for an attempt a router sends
// to a target service with the principal it authenticated: the target
// must be active and under its own rpm_limit.
func (s *Server) authorizeAttempt(r *http.Request, service string, rc *routedCaller, a *route.Attempt) (*http.Request, error) {
	ri := rc.ri // an attempt's context is the router's request's, and more
	if ri != nil {
		ri.service, ri.router, ri.attempts = service, a.Router, a.N
	}
	meta := s.meta(service)
	if err := s.admitTarget(r.Context(), service, meta); err != nil {
		var e *httpx.Error
		if ri != nil && errors.As(err, &e) {
			ri.code = e.Code
		}
		return nil, err
	}
	return s.openRequest(r, ri, rc.p, service, meta, rc, a), nil
}

// routerModels returns the models of a router's exact routes the caller
// may name.
func (s *Server) routerModels(p *auth.Principal, router string, t *route.Table) []string {
	var out []string
	meta := s.meta(router)
	for _, m := range t.Models() {
		if modelAllowed(meta, p, m) {
			out = append(out, m)
		}
	}
	return out
}

// serveRouterModels answers GET /v1/{router}/v1/models: the router's
// exact routes (aliases included; globs are not listed) that the router's
// and the caller's allow-lists let the caller name.
func (s *Server) serveRouterModels(w http.ResponseWriter, r *http.Request, router string, t *route.Table) {
	cred, err := proxy.Credential(r)
	if err != nil {
		writeError(w, err)
		return
	}
	caller, err := s.authorizeRouter(r, router, cred)
	if err != nil {
		writeError(w, err)
		return
	}
	writeModels(w, s.routerModels(caller.(*routedCaller).p, router, t), router)
}

// routerFor returns the table of the router a /v1/… path names, if it
// names one.
func (s *Server) routerFor(path string) (string, *route.Table, bool) {
	if len(path) < 4 || path[:4] != "/v1/" {
		return "", nil, false
	}
	name := path[4:]
	for i := 0; i < len(name); i++ {
		if name[i] == '/' {
			name = name[:i]
			break
		}
	}
	t, ok := s.routes.Router(name)
	return name, t, ok
}
