package admin

import (
	"errors"
	"net/http"
	"strings"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// tierInput is the body of POST and PATCH /admin/tiers.
type tierInput struct {
	Name        opt[string] `json:"name"`
	Description opt[string] `json:"description"`
	// Features maps each feature to its requests per minute on every key
	// of the tier (0: the feature is served without a limit of its own).
	Features opt[map[string]int] `json:"features"`
}

// maxTierFeatures bounds the features of one tier.
const maxTierFeatures = 256

func (in *tierInput) apply(t *store.Tier) error {
	if err := setDescription(in.Description, &t.Description); err != nil {
		return err
	}
	if in.Features.Set {
		if len(in.Features.V) == 0 {
			return badRequest("features must name at least one feature, e.g. {\"image-generation\": 100}")
		}
		if len(in.Features.V) > maxTierFeatures {
			return badRequest("features has %d entries; at most %d", len(in.Features.V), maxTierFeatures)
		}
		feats := make(map[string]int, len(in.Features.V))
		for f, rpm := range in.Features.V {
			name := strings.TrimSpace(f)
			if err := checkText("feature name", name, 128, true); err != nil {
				return err
			}
			if rpm < 0 || rpm > 1_000_000 {
				return badRequest("features[%q] must be 0 to 1000000 requests per minute (0: no limit of its own), got %d", name, rpm)
			}
			feats[name] = rpm
		}
		t.Features = feats
	}
	return nil
}

// tierStore returns the store's tiers, or a 501 when it keeps none.
func (a *API) tierStore() (store.TierStore, error) {
	ts, ok := a.st.(store.TierStore)
	if !ok {
		return nil, httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "this store keeps no tiers")
	}
	return ts, nil
}

// checkTier returns a 400 when the named tier does not exist.
func (a *API) checkTier(r *http.Request, name string) error {
	if name == "" {
		return nil
	}
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	if _, err := ts.GetTier(r.Context(), name); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return badRequest("tier %q does not exist; create it first with POST /admin/tiers", name)
		}
		return err
	}
	return nil
}

// tierFeatures returns the features of the named tier, nil when there is
// none.
func (a *API) tierFeatures(r *http.Request, name string) map[string]int {
	ts, ok := a.st.(store.TierStore)
	if name == "" || !ok {
		return nil
	}
	t, err := ts.GetTier(r.Context(), name)
	if err != nil {
		return nil
	}
	return t.Features
}

func (a *API) createTier(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	var in tierInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	name := strings.TrimSpace(in.Name.V)
	switch {
	case !in.Name.has() || name == "":
		return badRequest("name is required")
	case !store.ValidName(name):
		return badRequest("name %q is invalid: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", name)
	case !in.Features.has():
		return badRequest("features is required, e.g. {\"image-generation\": 100}")
	}
	t := store.Tier{Name: name}
	if err := in.apply(&t); err != nil {
		return err
	}
	if err := ts.CreateTier(r.Context(), &t); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("tier %q already exists", name)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: tier created", "tier", t.Name)
	a.changed()
	httpx.WriteJSON(w, http.StatusCreated, t)
	return nil
}

func (a *API) listTiers(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	list, err := ts.ListTiers(r.Context())
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"tiers": list})
	return nil
}

func (a *API) getTier(w http.ResponseWriter, r *http.Request) error {
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	t, err := ts.GetTier(r.Context(), name)
	if err != nil {
		return orNotFound(err, "tier %q not found", name)
	}
	httpx.WriteJSON(w, http.StatusOK, t)
	return nil
}

func (a *API) patchTier(w http.ResponseWriter, r *http.Request) error {
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	var in tierInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	t, err := ts.GetTier(r.Context(), name)
	if err != nil {
		return orNotFound(err, "tier %q not found", name)
	}
	if in.Name.Set && strings.TrimSpace(in.Name.V) != name {
		return badRequest("name cannot be changed; create a new tier and move the keys instead")
	}
	if in.Features.Null {
		return badRequest("features cannot be removed")
	}
	if err := in.apply(&t); err != nil {
		return err
	}
	if err := ts.UpdateTier(r.Context(), &t); err != nil {
		return orNotFound(err, "tier %q not found", name)
	}
	a.log.InfoContext(r.Context(), "admin: tier updated", "tier", t.Name)
	a.changed()
	httpx.WriteJSON(w, http.StatusOK, t)
	return nil
}

func (a *API) deleteTier(w http.ResponseWriter, r *http.Request) error {
	ts, err := a.tierStore()
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	if err := ts.DeleteTier(r.Context(), name); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("tier %q still has keys; move them to another tier or delete them first", name)
		}
		return orNotFound(err, "tier %q not found", name)
	}
	a.log.InfoContext(r.Context(), "admin: tier deleted", "tier", name)
	a.changed()
	w.WriteHeader(http.StatusNoContent)
	return nil
}
