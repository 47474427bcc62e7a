package admin

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// keyInput is the body of POST and PATCH /admin/keys, and one element of
// a JSON import.
type keyInput struct {
	Service  opt[string]         `json:"service"`
	KeyValue opt[keypool.Secret] `json:"key_value"`
	// Key is keypooler's name for key_value.
	Key opt[keypool.Secret] `json:"key"`
	// Name is keypooler's name of a key; it is kept as the label "name".
	Name         opt[string]            `json:"name"`
	BalanceTotal opt[float64]           `json:"balance_total"`
	BalanceUsed  opt[float64]           `json:"balance_used"`
	BalanceUnit  opt[string]            `json:"balance_unit"`
	AccountEmail opt[string]            `json:"account_email"`
	Weight       opt[int]               `json:"weight"`
	Priority     opt[int]               `json:"priority"`
	RateLimitRPM opt[int]               `json:"rate_limit_rpm"`
	MaxInFlight  opt[int]               `json:"max_in_flight"`
	Labels       opt[map[string]string] `json:"labels"`
	// Status is "active" or "disabled".
	Status opt[string] `json:"status"`
	// Tier names the tier the key joins; its features' rpm apply to the
	// key. Empty or null leaves the tier.
	Tier opt[string] `json:"tier"`
}

// apply copies the present fields other than service into k and
// validates the result (store.Validator.Key).
func (in *keyInput) apply(k *store.Key) error {
	if err := in.aliases(); err != nil {
		return err
	}
	if in.KeyValue.Set {
		// Checked here too: an empty value on a stored key would mean
		// "keep the stored one" to the validator.
		if err := store.CheckKeyValue(in.KeyValue.V); err != nil {
			return invalid(err)
		}
		k.Secret = in.KeyValue.V
	}
	setPresent(field[float64]{in.BalanceTotal, &k.BalanceTotal}, field[float64]{in.BalanceUsed, &k.BalanceUsed})
	setPresent(field[string]{in.BalanceUnit, &k.BalanceUnit}, field[string]{in.AccountEmail, &k.AccountEmail}, field[string]{in.Tier, &k.Tier})
	setPresent(field[int]{in.Weight, &k.Weight}, field[int]{in.Priority, &k.Priority},
		field[int]{in.RateLimitRPM, &k.RateLimitRPM}, field[int]{in.MaxInFlight, &k.MaxInFlight})
	setPresent(field[map[string]string]{in.Labels, &k.Labels})
	if err := (store.Validator{}).Key(k); err != nil {
		return invalid(err)
	}
	if in.Status.Set {
		switch st := strings.TrimSpace(in.Status.V); st {
		case store.StatusActive, store.StatusDisabled:
			k.Status = st
			k.StatusReason = ""
			if st == store.StatusDisabled {
				k.StatusReason = "disabled by admin"
			}
		default:
			return badRequest("status must be %q or %q, not %q", store.StatusActive, store.StatusDisabled, in.Status.V)
		}
	}
	return nil
}

// keyView is a key as the API shows it: stored settings merged with the
// pool's live state. It has no field for the key's value.
type keyView struct {
	ID      string `json:"id"`
	Service string `json:"service"`
	Hint    string `json:"hint"`
	// State is the live state: active, cooling, open (half-open breakers
	// included), invalid, exhausted or disabled.
	State string `json:"state"`
	// Breaker is the circuit breaker's state: closed, open or half-open.
	Breaker            string     `json:"breaker,omitempty"`
	Reason             string     `json:"reason,omitempty"`
	CooldownUntil      *time.Time `json:"cooldown_until"`
	InFlight           int64      `json:"in_flight"`
	RequestsLastMinute int        `json:"requests_last_minute"`
	// Refusals counts ambiguous refusals (a bare 403 another key then
	// served) since the key's last success; confirm_refusals of them make
	// it invalid.
	Refusals int `json:"refusals,omitempty"`
	// Held reports that the key's breaker tripped beyond the service's
	// max_ejection_percent and the key was kept in rotation.
	Held bool `json:"held,omitempty"`
	// Status is the stored status, which survives restarts.
	Status       string            `json:"status"`
	StatusReason string            `json:"status_reason,omitempty"`
	Weight       int               `json:"weight"`
	Priority     int               `json:"priority"`
	RateLimitRPM int               `json:"rate_limit_rpm,omitempty"`
	MaxInFlight  int               `json:"max_in_flight,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	// Tier is the key's tier; Features its features' use in the current
	// minute (rpm, used, available), or their rpm alone when the pool
	// has no live state for the key.
	Tier         string                        `json:"tier,omitempty"`
	Features     map[string]keypool.FeatureUse `json:"features,omitempty"`
	BalanceTotal float64                       `json:"balance_total"`
	BalanceUsed  float64                       `json:"balance_used"`
	BalanceUnit  string                        `json:"balance_unit,omitempty"`
	// BalanceRemaining is the pool's view of what is left (stored balance
	// less live spend), when the key has a balance.
	BalanceRemaining *float64  `json:"balance_remaining,omitempty"`
	AccountEmail     string    `json:"account_email,omitempty"`
	Origin           string    `json:"origin,omitempty"`
	CreatedAt        time.Time `json:"created_at"`
	UpdatedAt        time.Time `json:"updated_at"`
}

// liveStats returns the pool's stats of a service's keys by id.
func (a *API) liveStats(service string) map[string]keypool.KeyStats {
	if a.pool == nil {
		return nil
	}
	st, ok := a.pool.Stats(service)
	if !ok {
		return nil
	}
	m := make(map[string]keypool.KeyStats, len(st))
	for _, s := range st {
		m[s.ID] = s
	}
	return m
}

// stateName maps a pool state to the API's names: half-open shows as
// "open" (the breaker field tells them apart).
func stateName(s keypool.State) string {
	if s == keypool.StateHalfOpen {
		return keypool.StateOpen.String()
	}
	return s.String()
}

// liveState names a key's live state: a key probing after a cooldown or
// quota reset (half-open with a closed breaker) is in rotation and shows
// as "active", its reason saying it probes.
func liveState(s keypool.KeyStats) string {
	if s.State == keypool.StateHalfOpen && s.Breaker != "half_open" {
		return keypool.StateActive.String()
	}
	return stateName(s.State)
}

func viewKey(k *store.Key, live map[string]keypool.KeyStats) keyView {
	v := keyView{
		ID: k.ID, Service: k.Service, Hint: k.Hint, State: k.Status,
		Status: k.Status, StatusReason: k.StatusReason, Weight: k.Weight, Priority: k.Priority,
		RateLimitRPM: k.RateLimitRPM, MaxInFlight: k.MaxInFlight, Labels: k.Labels,
		BalanceTotal: k.BalanceTotal, BalanceUsed: roundCost(k.BalanceUsed), BalanceUnit: k.BalanceUnit,
		AccountEmail: k.AccountEmail, Origin: k.Origin, CreatedAt: k.CreatedAt, UpdatedAt: k.UpdatedAt,
		Tier: k.Tier,
	}
	for f, rpm := range k.Features {
		if v.Features == nil {
			v.Features = make(map[string]keypool.FeatureUse, len(k.Features))
		}
		v.Features[f] = keypool.FeatureUse{RPM: rpm, Available: rpm}
	}
	if v.Hint == "" {
		v.Hint = k.Secret.Hint()
	}
	if s, ok := live[k.ID]; ok {
		v.State, v.Reason, v.Breaker = liveState(s), s.Reason, s.Breaker
		v.Refusals, v.Held = s.Refusals, s.Held
		if !s.Until.IsZero() {
			u := s.Until.UTC()
			v.CooldownUntil = &u
		}
		v.InFlight, v.RequestsLastMinute = s.InFlight, s.RequestsLastMinute
		for f, u := range s.Features {
			if _, ok := v.Features[f]; ok && u.RPM == v.Features[f].RPM {
				v.Features[f] = u
			}
		}
		if s.Remaining >= 0 && k.BalanceTotal > 0 {
			rem := roundCost(s.Remaining)
			v.BalanceRemaining = &rem
		}
	}
	return v
}

// onlyService names the service of a key added without one (keypooler's
// POST /admin/keys has no service): the one service there is, else a 400.
func (a *API) onlyService(r *http.Request) (string, error) {
	ss, err := a.st.Services(r.Context())
	if err != nil {
		return "", err
	}
	if len(ss) != 1 {
		return "", badRequest("service is required (it may be left out only while exactly one service exists; there are %d)", len(ss))
	}
	return ss[0].Name, nil
}

// service returns a service, with a 400 naming the field when it does
// not exist.
func (a *API) serviceForKey(ctx context.Context, name string) error {
	if name == "" {
		return badRequest("service is required")
	}
	svc, err := a.st.GetService(ctx, name)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return badRequest("service %q does not exist; create it first", name)
		}
		return err
	}
	if svc.Kind == store.KindRouter {
		return badRequest("service %q is a router: it holds no keys; add keys to the services its routes name", name)
	}
	return nil
}

func (a *API) createKey(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in keyInput
	if err := decode(w, r, &in); err != nil {
		var he *httpx.Error
		if errors.As(err, &he) && he.Message == errNotObject {
			he.Message += "; to add many keys use POST /admin/keys/import"
		}
		return err
	}
	if err := in.aliases(); err != nil {
		return err
	}
	if !in.KeyValue.has() {
		return badRequest("key_value is required")
	}
	k := store.Key{Service: strings.TrimSpace(in.Service.V), Status: store.StatusActive}
	if err := in.apply(&k); err != nil {
		return err
	}
	if k.Service == "" {
		svc, err := a.onlyService(r)
		if err != nil {
			return err
		}
		k.Service = svc
	}
	if err := a.serviceForKey(r.Context(), k.Service); err != nil {
		return err
	}
	if err := a.checkTier(r, k.Tier); err != nil {
		return err
	}
	if err := a.st.CreateKeys(r.Context(), []*store.Key{&k}); err != nil {
		switch {
		case errors.Is(err, store.ErrConflict):
			return conflict("this key_value is already in service %q", k.Service)
		case errors.Is(err, store.ErrInvalid):
			return badRequest("service %q does not exist", k.Service)
		}
		return err
	}
	k.Features = a.tierFeatures(r, k.Tier)
	a.log.InfoContext(r.Context(), "admin: key created", "service", k.Service, "key_id", k.ID, "hint", k.Hint)
	a.changed()
	httpx.WriteJSON(w, http.StatusCreated, viewKey(&k, a.liveStats(k.Service)))
	return nil
}

func (a *API) listKeys(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "service"); err != nil {
		return err
	}
	service := r.URL.Query().Get("service")
	if service != "" {
		if _, err := a.st.GetService(r.Context(), service); err != nil {
			return orNotFound(err, "service %q not found", service)
		}
	}
	ks, err := a.st.Keys(r.Context(), service)
	if err != nil {
		return err
	}
	live := map[string]map[string]keypool.KeyStats{}
	out := make([]keyView, len(ks))
	for i := range ks {
		m, ok := live[ks[i].Service]
		if !ok {
			m = a.liveStats(ks[i].Service)
			live[ks[i].Service] = m
		}
		out[i] = viewKey(&ks[i], m)
		ks[i].Secret = ""
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"keys": out})
	return nil
}

func (a *API) getKey(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	k, err := a.st.GetKey(r.Context(), id)
	if err != nil {
		return orNotFound(err, "key %q not found", id)
	}
	httpx.WriteJSON(w, http.StatusOK, viewKey(&k, a.liveStats(k.Service)))
	return nil
}

func (a *API) patchKey(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var in keyInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	k, err := a.st.GetKey(r.Context(), id)
	if err != nil {
		return orNotFound(err, "key %q not found", id)
	}
	if in.Service.Set && strings.TrimSpace(in.Service.V) != k.Service {
		return badRequest("service cannot be changed; add the key to the other service instead")
	}
	if in.KeyValue.Null {
		return badRequest("key_value cannot be removed")
	}
	oldStatus := k.Status
	k.Secret = "" // keep the stored value unless key_value is given
	if err := in.apply(&k); err != nil {
		return err
	}
	if in.Tier.Set {
		if err := a.checkTier(r, k.Tier); err != nil {
			return err
		}
	}
	if err := a.st.UpdateKey(r.Context(), &k); err != nil {
		switch {
		case errors.Is(err, store.ErrConflict):
			return conflict("this key_value is already in service %q", k.Service)
		}
		return orNotFound(err, "key %q not found", id)
	}
	if in.Tier.Set {
		k.Features = a.tierFeatures(r, k.Tier)
	}
	rotated := in.KeyValue.has()
	k.Secret = ""
	if a.pool != nil && in.Status.Set {
		switch {
		case k.Status == store.StatusActive:
			a.pool.SetKeyState(k.Service, k.ID, keypool.StateActive, time.Time{}, "enabled by admin")
		case k.Status == store.StatusDisabled:
			a.pool.SetKeyState(k.Service, k.ID, keypool.StateDisabled, time.Time{}, "disabled by admin")
		}
	}
	a.log.InfoContext(r.Context(), "admin: key updated", "service", k.Service, "key_id", k.ID,
		"status", k.Status, "previous_status", oldStatus, "rotated", rotated)
	a.changed()
	httpx.WriteJSON(w, http.StatusOK, viewKey(&k, a.liveStats(k.Service)))
	return nil
}

func (a *API) deleteKey(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	k, err := a.st.GetKey(r.Context(), id)
	if err != nil {
		return orNotFound(err, "key %q not found", id)
	}
	if err := a.st.DeleteKey(r.Context(), id); err != nil {
		return orNotFound(err, "key %q not found", id)
	}
	if a.pool != nil {
		// Out of rotation at once, even before the server reloads.
		a.pool.SetKeyState(k.Service, k.ID, keypool.StateDisabled, time.Time{}, "deleted")
	}
	a.log.InfoContext(r.Context(), "admin: key deleted", "service", k.Service, "key_id", k.ID)
	a.changed()
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// aliases folds keypooler's field names into keypool's: key is key_value,
// name becomes the label "name". Giving both names of a field is an error.
func (in *keyInput) aliases() error {
	if in.Key.Set {
		if in.KeyValue.Set {
			return badRequest("give key_value or its alias key, not both")
		}
		in.KeyValue, in.Key = in.Key, opt[keypool.Secret]{}
	}
	if in.Name.Set {
		name := strings.TrimSpace(in.Name.V)
		if err := checkText("name", name, 128, false); err != nil {
			return err
		}
		if name != "" {
			labels := map[string]string{}
			for k, v := range in.Labels.V {
				labels[k] = v
			}
			if old, ok := labels["name"]; ok && old != name {
				return badRequest("name %q and labels.name %q differ", name, old)
			}
			labels["name"] = name
			in.Labels = opt[map[string]string]{Set: true, V: labels}
		}
		in.Name = opt[string]{}
	}
	return nil
}
