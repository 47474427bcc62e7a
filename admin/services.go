package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
)

// serviceInput is the body of POST and PATCH /admin/services.
type serviceInput struct {
	Name        opt[string] `json:"name"`
	DisplayName opt[string] `json:"display_name"`
	Description opt[string] `json:"description"`
	// IsActive false switches the service off (default true).
	IsActive     opt[bool]              `json:"is_active"`
	BaseURL      opt[string]            `json:"base_url"`
	AuthScheme   opt[string]            `json:"auth_scheme"`
	RateLimitRPM opt[int]               `json:"rate_limit_rpm"`
	MaxInFlight  opt[int]               `json:"max_in_flight"`
	ProxyHeaders opt[map[string]string] `json:"proxy_headers"`
	Selector     opt[string]            `json:"selector"`
	ExternalName opt[string]            `json:"external_name"`
	// Prices is a JSON object of model → price (or {"models": {…}}), as
	// meter.ParsePrices reads.
	Prices opt[json.RawMessage] `json:"prices"`
	// LLMFamily is the metered wire format: openai, anthropic, gemini,
	// none, or empty for detection per request.
	LLMFamily opt[string] `json:"llm_family"`
	// Kind is "router" for a router (set at creation only).
	Kind opt[string] `json:"kind"`
	// Routes are a router's model routes (see package route).
	Routes opt[[]store.Route] `json:"routes"`
	// Router is a router's attempt budget and breaker settings
	// (store.RouterSettings, read strictly); null restores the defaults.
	Router opt[json.RawMessage] `json:"router"`
	timeoutsInput
	limitsInput
	keyPolicyInput
}

// keyPolicyInput is how the service's pool judges its keys
// (store.KeyPolicy); 0 or null means the default.
type keyPolicyInput struct {
	RetryAfterCap      opt[int] `json:"retry_after_cap"`
	ConfirmRefusals    opt[int] `json:"confirm_refusals"`
	MinActiveKeys      opt[int] `json:"min_active_keys"`
	MaxEjectionPercent opt[int] `json:"max_ejection_percent"`
	// Classifier names a classifier registered with the server; empty or
	// null means the built-in one.
	Classifier opt[string] `json:"classifier"`
}

// apply copies the present fields into p.
func (in *keyPolicyInput) apply(p *store.KeyPolicy) {
	setPresent(
		field[int]{in.RetryAfterCap, &p.RetryAfterCap},
		field[int]{in.ConfirmRefusals, &p.ConfirmRefusals},
		field[int]{in.MinActiveKeys, &p.MinActiveKeys},
		field[int]{in.MaxEjectionPercent, &p.MaxEjectionPercent},
	)
	setPresent(field[string]{in.Classifier, &p.Classifier})
}

// serviceView is a service as the API shows it: prices as a JSON object.
type serviceView struct {
	store.Service
	IsActive bool `json:"is_active"`
	timeoutsView
	Prices json.RawMessage `json:"prices,omitempty"`
}

func viewService(s store.Service) serviceView {
	v := serviceView{Service: s, IsActive: !s.Disabled, timeoutsView: viewTimeouts(s)}
	if s.Prices != "" && json.Valid([]byte(s.Prices)) {
		v.Prices = json.RawMessage(s.Prices)
	}
	return v
}

// apply copies the present fields into s; a null clears a field. The
// caller validates the whole record (store.Validator.Service).
func (in *serviceInput) apply(s *store.Service) error {
	setPresent(
		field[string]{in.DisplayName, &s.DisplayName}, field[string]{in.Description, &s.Description},
		field[string]{in.BaseURL, &s.BaseURL}, field[string]{in.AuthScheme, &s.AuthScheme},
		field[string]{in.Selector, &s.Selector}, field[string]{in.ExternalName, &s.ExternalName},
		field[string]{in.LLMFamily, &s.LLMFamily},
	)
	if in.IsActive.Set {
		s.Disabled = !in.IsActive.Null && !in.IsActive.V
	}
	setPresent(field[int]{in.RateLimitRPM, &s.RateLimitRPM}, field[int]{in.MaxInFlight, &s.MaxInFlight})
	setPresent(field[map[string]string]{in.ProxyHeaders, &s.ProxyHeaders})
	if in.Prices.Set {
		s.Prices = string(bytes.TrimSpace(in.Prices.V))
	}
	in.keyPolicyInput.apply(&s.KeyPolicy)
	if err := in.timeoutsInput.apply(s); err != nil {
		return err
	}
	in.limitsInput.set(&s.Limits)
	if in.Routes.Set {
		s.Routes = in.Routes.V
	}
	if in.Router.Set {
		rs, err := decodeRouterSettings(in.Router)
		if err != nil {
			return err
		}
		s.Router = rs
	}
	return nil
}

// decodeRouterSettings reads a router's settings strictly: an unknown
// field is a 400, not a setting silently left at its default.
func decodeRouterSettings(in opt[json.RawMessage]) (*store.RouterSettings, error) {
	if in.Null {
		return nil, nil
	}
	dec := json.NewDecoder(bytes.NewReader(in.V))
	dec.DisallowUnknownFields()
	var rs store.RouterSettings
	if err := dec.Decode(&rs); err != nil {
		return nil, badRequest("router must be an object of max_attempts, breaker_failures, breaker_open_seconds and breaker_max_open_seconds (whole numbers): %s",
			strings.TrimPrefix(err.Error(), "json: "))
	}
	return &rs, nil
}

// checkRouter validates a router's routes against the other services
// (see route.Validate); the record itself (kind, no base_url, routes only
// on a router) is store.Validator's to check.
func (a *API) checkRouter(ctx context.Context, s *store.Service) error {
	if s.Kind != store.KindRouter {
		return nil
	}
	ss, err := a.st.Services(ctx)
	if err != nil {
		return err
	}
	byName := make(map[string]store.Service, len(ss))
	for _, sv := range ss {
		byName[sv.Name] = sv
	}
	if _, err := route.Validate(s.Name, s.Routes, func(name string) (store.Service, bool) {
		sv, ok := byName[name]
		return sv, ok
	}); err != nil {
		return badRequest("%s", strings.TrimPrefix(err.Error(), route.ErrInvalid.Error()+": "))
	}
	return nil
}

func (a *API) createService(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in serviceInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	s := store.Service{Name: in.Name.V, Kind: strings.TrimSpace(in.Kind.V), AuthScheme: "bearer", Selector: "round_robin"}
	if err := in.apply(&s); err != nil {
		return err
	}
	if err := a.valid.Service(&s); err != nil {
		return invalid(err)
	}
	if err := a.checkRouter(r.Context(), &s); err != nil {
		return err
	}
	name := s.Name
	if err := a.st.CreateService(r.Context(), &s); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("service %q already exists", name)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: service created", "service", s.Name, "base_url", s.BaseURL)
	a.changed()
	httpx.WriteJSON(w, http.StatusCreated, viewService(s))
	return nil
}

func (a *API) listServices(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	ss, err := a.st.Services(r.Context())
	if err != nil {
		return err
	}
	out := make([]serviceView, len(ss))
	for i := range ss {
		out[i] = viewService(ss[i])
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"services": out})
	return nil
}

func (a *API) getService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	s, err := a.st.GetService(r.Context(), name)
	if err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	httpx.WriteJSON(w, http.StatusOK, viewService(s))
	return nil
}

func (a *API) patchService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	var in serviceInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	s, err := a.st.GetService(r.Context(), name)
	if err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	if in.Name.Set && strings.TrimSpace(in.Name.V) != name {
		return badRequest("name cannot be changed; create a new service instead")
	}
	if in.BaseURL.Null && s.Kind != store.KindRouter {
		return badRequest("base_url cannot be removed")
	}
	if in.Kind.Set && strings.TrimSpace(in.Kind.V) != s.Kind {
		return badRequest("kind cannot be changed; create a new service instead")
	}
	if err := in.apply(&s); err != nil {
		return err
	}
	if err := a.valid.Service(&s); err != nil {
		return invalid(err)
	}
	if err := a.checkRouter(r.Context(), &s); err != nil {
		return err
	}
	if err := a.st.UpdateService(r.Context(), &s); err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	a.log.InfoContext(r.Context(), "admin: service updated", "service", s.Name)
	a.changed()
	httpx.WriteJSON(w, http.StatusOK, viewService(s))
	return nil
}

func (a *API) deleteService(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	ss, err := a.st.Services(r.Context())
	if err != nil {
		return err
	}
	for _, sv := range ss {
		for _, rt := range sv.Routes {
			for _, tg := range rt.Targets {
				if tg.Service == name {
					return conflict("service %q is a target of router %q (route %q); remove it from the routes first", name, sv.Name, rt.Model)
				}
			}
		}
	}
	if err := a.st.DeleteService(r.Context(), name); err != nil {
		return orNotFound(err, "service %q not found", name)
	}
	if a.pool != nil {
		a.pool.RemoveService(name)
	}
	a.log.InfoContext(r.Context(), "admin: service deleted", "service", name)
	a.changed()
	w.WriteHeader(http.StatusNoContent)
	return nil
}
