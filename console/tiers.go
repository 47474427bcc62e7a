package console

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/keypool/keypool/auth"
)

// tierRow is a tier of GET /admin/tiers, with how many keys are in it.
type tierRow struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Features    map[string]int `json:"features"`
	Keys        int            `json:"-"`
}

// FeatureList returns the tier's features sorted by name.
func (t tierRow) FeatureList() []featureRPM {
	out := make([]featureRPM, 0, len(t.Features))
	for f, rpm := range t.Features {
		out = append(out, featureRPM{f, rpm})
	}
	slices.SortFunc(out, func(a, b featureRPM) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// featureRPM is one feature of a tier and its requests per minute.
type featureRPM struct {
	Name string
	RPM  int
}

// featuresText renders features for the form's textarea: "name: rpm"
// lines.
func featuresText(feats map[string]int) string {
	var lines []string
	for _, f := range (tierRow{Features: feats}).FeatureList() {
		lines = append(lines, f.Name+": "+strconv.Itoa(f.RPM))
	}
	return strings.Join(lines, "\n")
}

// tierBody turns the tier form into a POST or PATCH /admin/tiers body.
// Features are "name: rpm" lines (a line without a number means 0: no
// limit of its own); a value that is not a number is passed on for the
// admin API to reject, so the console judges nothing itself.
func tierBody(r *http.Request, create bool) map[string]any {
	b := map[string]any{}
	if create {
		b["name"] = strings.TrimSpace(r.PostFormValue("name"))
	}
	if _, ok := r.PostForm["description"]; ok {
		b["description"] = strings.TrimSpace(r.PostFormValue("description"))
	}
	text := strings.TrimSpace(r.PostFormValue("features"))
	if text == "" && create {
		return b // the API says features is required
	}
	feats := map[string]any{}
	for _, line := range strings.Split(text, "\n") {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		name, v := line, ""
		if i := strings.LastIndexAny(line, ":="); i >= 0 {
			name, v = strings.TrimSpace(line[:i]), strings.TrimSpace(line[i+1:])
		}
		switch {
		case v == "":
			feats[name] = 0
		case json.Valid([]byte(v)) && strings.Trim(v, "-0123456789") == "":
			feats[name] = json.Number(v)
		default:
			feats[name] = v // "must be a number", from the API
		}
	}
	b["features"] = feats
	return b
}

func (h *Handler) tiers(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.showTiers(w, r, id, http.StatusOK, view{Flash: flash(r)}, map[string]string{})
}

// listTiers returns the tiers with their key counts.
func (h *Handler) listTiers(r *http.Request, id auth.Identity) ([]tierRow, error) {
	var ts struct {
		Tiers []tierRow `json:"tiers"`
	}
	if err := h.get(r, id, "/admin/tiers", &ts); err != nil {
		return nil, err
	}
	var ks struct {
		Keys []struct {
			Tier string `json:"tier"`
		} `json:"keys"`
	}
	_ = h.get(r, id, "/admin/keys", &ks)
	n := map[string]int{}
	for _, k := range ks.Keys {
		n[k.Tier]++
	}
	for i := range ts.Tiers {
		ts.Tiers[i].Keys = n[ts.Tiers[i].Name]
	}
	return ts.Tiers, nil
}

func (h *Handler) showTiers(w http.ResponseWriter, r *http.Request, id auth.Identity, status int, v view, vals map[string]string) {
	list, err := h.listTiers(r, id)
	if err != nil && v.Error == "" {
		v.Error = err.Error()
	}
	v.Title, v.Nav, v.User = "Tiers", "tiers", id
	v.Data = map[string]any{"Tiers": list, "Values": vals}
	h.render(w, status, "tiers", v)
}

func (h *Handler) tierCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	_ = r.ParseForm()
	res := h.call(r, id, http.MethodPost, "/admin/tiers", tierBody(r, true))
	if !res.ok() {
		h.showTiers(w, r, id, res.Status, view{Error: res.errMessage()}, formValues(r))
		return
	}
	redirect(w, r, Prefix+"tiers", "Tier "+strings.TrimSpace(r.PostFormValue("name"))+" created.")
}

func (h *Handler) tierDetail(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	var t tierRow
	if err := h.get(r, id, "/admin/tiers/"+url.PathEscape(name), &t); err != nil {
		h.render(w, http.StatusNotFound, "error", view{Title: "Not found", Nav: "tiers", User: id, Error: err.Error()})
		return
	}
	h.showTier(w, id, http.StatusOK, view{Flash: flash(r)}, name,
		map[string]string{"description": t.Description, "features": featuresText(t.Features)})
}

func (h *Handler) showTier(w http.ResponseWriter, id auth.Identity, status int, v view, name string, vals map[string]string) {
	v.Title, v.Nav, v.User = "Tier "+name, "tiers", id
	v.Data = map[string]any{"Name": name, "Values": vals}
	h.render(w, status, "tier", v)
}

func (h *Handler) tierUpdate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	_ = r.ParseForm()
	res := h.call(r, id, http.MethodPatch, "/admin/tiers/"+url.PathEscape(name), tierBody(r, false))
	if !res.ok() {
		h.showTier(w, id, res.Status, view{Error: res.errMessage()}, name, formValues(r))
		return
	}
	redirect(w, r, Prefix+"tiers", "Tier "+name+" saved.")
}

func (h *Handler) tierDelete(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	res := h.call(r, id, http.MethodDelete, "/admin/tiers/"+url.PathEscape(name), nil)
	if !res.ok() {
		redirect(w, r, Prefix+"tiers", res.errMessage())
		return
	}
	redirect(w, r, Prefix+"tiers", "Tier "+name+" deleted.")
}

// keyTier moves a key into a tier (or out of every tier: an empty
// value), through PATCH /admin/keys/{id}.
func (h *Handler) keyTier(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	kid, tier := r.PathValue("id"), strings.TrimSpace(r.PostFormValue("tier"))
	back := Prefix + "services/" + url.PathEscape(r.PostFormValue("service"))
	res := h.call(r, id, http.MethodPatch, "/admin/keys/"+url.PathEscape(kid), map[string]any{"tier": tier})
	if !res.ok() {
		redirect(w, r, back, res.errMessage())
		return
	}
	if tier == "" {
		redirect(w, r, back, "Key "+kid+" is in no tier now.")
		return
	}
	redirect(w, r, back, "Key "+kid+" is now in tier "+tier+".")
}
