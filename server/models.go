package server

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/proxy"
)

// errModelRequired is the refusal of a request that must name a model
// (see [meter.RequiresModel]) and names none, or names it ambiguously,
// while an allow-list applies.
func errModelRequired() error {
	return httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
		"models_enabled is set: the request must name an enabled model")
}

// checkModels enforces the model allow-lists that apply to a request
// (service, team, token). It fails closed: every model the request names
// — in the path (".../models/{m}"), in a query parameter or a JSON member
// or form field named "model", "model_id" or "modelId" (JSON names
// compared unescaped, every occurrence) — must be on every list; a
// model member that is not a plain string, JSON members naming different
// models, or a form or query that cannot be read are refused; and a
// request that names no model is refused when [meter.RequiresModel] says
// it must name one. It reads the body only through info (its JSON members
// and, read by [meter.RequestInfo.ReadForm], its form fields). It returns
// the first model named, for pricing.
func checkModels(r *http.Request, meta *svcMeta, p *auth.Principal, fam meter.Family, hasBody bool, info *meter.RequestInfo) (string, error) {
	var first string
	found := false
	var refused error
	check := func(m string) {
		if refused != nil {
			return
		}
		if !found {
			first, found = m, true
		}
		// Gemini bodies (cachedContents) name "models/gemini-…".
		if m2 := strings.TrimPrefix(m, "models/"); !modelAllowed(meta, p, m2) {
			refused = httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "model %q is not enabled for this service, team or token", m2)
		}
	}
	meter.EachPathModel(r.URL.Path, check)
	if raw := r.URL.RawQuery; raw != "" {
		q, err := url.ParseQuery(raw)
		if err != nil && strings.Contains(strings.ToLower(raw), "model") {
			return "", errModelRequired() // a query an upstream may read otherwise
		}
		for _, name := range meter.ModelParams {
			for _, v := range q[name] {
				check(v)
			}
		}
	}
	if info.ModelAmbiguous {
		return "", errModelRequired()
	}
	if info.Model != "" {
		check(info.Model)
	}
	for _, m := range info.FormModels {
		check(m)
	}
	if info.FormUnreadable && refused == nil {
		return "", httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
			"models_enabled is set: the request's form could not be read to check its model")
	}
	if refused != nil {
		return "", refused
	}
	if !found && meter.RequiresModel(r.URL.Path, hasBody, fam != meter.FamilyNone) {
		return "", errModelRequired()
	}
	return strings.TrimPrefix(first, "models/"), nil
}

// modelAllowed reports whether every non-empty allow-list (service, team,
// token) holds model; p nil checks the service's alone.
func modelAllowed(meta *svcMeta, p *auth.Principal, model string) bool {
	if l := meta.limits.ModelsEnabled; len(l) > 0 && !slices.Contains(l, model) {
		return false
	}
	return p == nil || p.AllowsModel(model)
}

// modelsPath reports whether path is a model listing, GET
// /v1/{service}/models or /v1/{service}/v1/models, and names the service.
func modelsPath(path string) (string, bool) {
	rest, ok := strings.CutPrefix(path, "/v1/")
	if !ok {
		return "", false
	}
	svc, tail, ok := strings.Cut(rest, "/")
	if !ok || svc == "" || (tail != "models" && tail != "v1/models") {
		return "", false
	}
	return svc, true
}

// serveV1 answers model listings of services with an allow-list itself,
// and hands everything else to the proxy.
func (s *Server) serveV1(w http.ResponseWriter, r *http.Request) {
	if name, t, ok := s.routerFor(r.URL.Path); ok {
		if ri := infoFrom(r.Context()); ri != nil {
			ri.router = name
		}
		if _, models := modelsPath(r.URL.Path); models && r.Method == http.MethodGet {
			s.serveRouterModels(w, r, name, t)
			return
		}
		s.routes.Serve(w, r, t)
		return
	}
	if r.Method == http.MethodGet {
		if name, ok := modelsPath(r.URL.Path); ok {
			if meta := s.meta(name); len(meta.limits.ModelsEnabled) > 0 {
				s.serveModels(w, r, name, meta)
				return
			}
		}
	}
	s.proxy.ServeHTTP(w, r)
}

type modelEntry struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

// serveModels answers the OpenAI-style list of the models enabled for
// the caller: the service's allow-list, narrowed by the team's and the
// token's.
func (s *Server) serveModels(w http.ResponseWriter, r *http.Request, service string, meta *svcMeta) {
	ri := infoFrom(r.Context())
	if ri != nil {
		ri.service = service
	}
	fail := func(err error) {
		if e, ok := err.(*httpx.Error); ok && ri != nil {
			ri.code = e.Code
		}
		writeError(w, err)
	}
	cred, err := proxy.Credential(r)
	if err != nil {
		fail(err)
		return
	}
	p, err := s.authenticate(r, cred, false)
	if err != nil {
		fail(err)
		return
	}
	if ri != nil {
		ri.teamID, ri.tokenID = p.Team.ID, p.Token.ID
	}
	if err := s.admit(r.Context(), p, service); err != nil {
		fail(err)
		return
	}
	if _, ok := s.pool.Service(service); !ok {
		fail(httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service))
		return
	}
	var models []string
	for _, m := range meta.limits.ModelsEnabled {
		if p.AllowsModel(m) {
			models = append(models, m)
		}
	}
	writeModels(w, models, service)
}

// writeModels answers an OpenAI-style model list.
func writeModels(w http.ResponseWriter, models []string, owner string) {
	data := make([]modelEntry, 0, len(models))
	for _, m := range models {
		data = append(data, modelEntry{ID: m, Object: "model", OwnedBy: owner})
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		Object string       `json:"object"`
		Data   []modelEntry `json:"data"`
	}{"list", data})
}
