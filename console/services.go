package console

import (
	"net/http"
	"net/url"

	"strings"
	"time"

	"github.com/keypool/keypool/auth"
)

func (h *Handler) loginPage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	h.render(w, http.StatusOK, "login", view{Title: "Sign in", Data: h.loginData(safeNext(r.URL.Query().Get("next")), "")})
}

// loginData is the sign-in page's data.
func (h *Handler) loginData(next, user string) map[string]string {
	d := map[string]string{"Next": next, "Username": user}
	if h.ssoLogin != "" {
		d["SSO"] = h.ssoLogin
	}
	return d
}

// safeNext keeps a post-sign-in redirect inside the console.
func safeNext(next string) string {
	if !strings.HasPrefix(next, Prefix) || strings.HasPrefix(next, "//") || strings.ContainsAny(next, "\\\r\n") {
		return Prefix
	}
	return next
}

func (h *Handler) loginSubmit(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	user, pw := r.PostFormValue("username"), r.PostFormValue("password")
	next := safeNext(r.PostFormValue("next"))
	data := h.loginData(next, user)
	if user == "" || pw == "" {
		h.render(w, http.StatusBadRequest, "login", view{Title: "Sign in", Error: "Enter your username and password.", Data: data})
		return
	}
	resp, err := h.api.Login(r, user, pw)
	if err != nil {
		status := http.StatusUnauthorized
		if strings.Contains(err.Error(), "too many") {
			status = http.StatusTooManyRequests
		}
		h.render(w, status, "login", view{Title: "Sign in", Error: err.Error(), Data: data})
		return
	}
	h.setCookie(w, r, resp.AccessToken, resp.ExpiresAt)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (h *Handler) logout(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.call(r, id, http.MethodPost, "/admin/auth/logout", nil)
	h.clearCookie(w, r)
	redirect(w, r, Prefix+"login", "")
}

// healthService is a service of GET /admin/health.
type healthService struct {
	Name               string         `json:"name"`
	Keys               int            `json:"keys"`
	States             map[string]int `json:"states"`
	Available          int            `json:"available"`
	InFlight           int64          `json:"in_flight"`
	RequestsLastMinute int            `json:"requests_last_minute"`
}

// overviewRow is a service on the overview.
type overviewRow struct {
	healthService
	RPM         int // sum of the keys' rate limits, or 0
	RateLimited int64
	Errors      int64
	Requests    int64
	Warnings    []string
}

var stateOrder = []string{"active", "cooling", "open", "invalid", "exhausted", "disabled"}

func (h *Handler) overviewData(r *http.Request, id auth.Identity) (view, error) {
	var health struct {
		Status   string          `json:"status"`
		Services []healthService `json:"services"`
	}
	if err := h.get(r, id, "/admin/health", &health); err != nil {
		return view{}, err
	}
	var counts map[string]struct{ Requests, RateLimited, Errors int64 }
	if h.statuses != nil {
		if c, err := h.statuses.UsageStatusCounts(r.Context(), h.now().Add(-time.Hour)); err == nil {
			counts = make(map[string]struct{ Requests, RateLimited, Errors int64 }, len(c))
			for k, v := range c {
				counts[k] = struct{ Requests, RateLimited, Errors int64 }{v.Requests, v.RateLimited, v.Errors}
			}
		}
	}
	budgets := h.budgetUse(r, id)
	rows := make([]overviewRow, 0, len(health.Services))
	for _, s := range health.Services {
		row := overviewRow{healthService: s}
		c := counts[s.Name]
		row.Requests, row.RateLimited, row.Errors = c.Requests, c.RateLimited, c.Errors
		for _, b := range budgets {
			if b.Scope == "service" && b.Name == s.Name && b.Level != "" {
				row.Warnings = append(row.Warnings, b.Window+" cost "+b.Level+" ("+b.UsedText+" of "+b.LimitText+")")
			}
		}
		rows = append(rows, row)
	}
	var teamWarnings []budgetLine
	for _, b := range budgets {
		if b.Scope == "team" && b.Level != "" {
			teamWarnings = append(teamWarnings, b)
		}
	}
	return view{Title: "Overview", Nav: "overview", User: id, Data: map[string]any{
		"Status": health.Status, "Services": rows, "States": stateOrder, "TeamWarnings": teamWarnings,
		"Updated": h.now().UTC().Format("15:04:05 UTC"),
	}}, nil
}

func (h *Handler) overview(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	v, err := h.overviewData(r, id)
	if err != nil {
		v = view{Title: "Overview", Nav: "overview", User: id, Error: err.Error()}
	}
	v.Flash = flash(r)
	h.render(w, http.StatusOK, "overview", v)
}

func (h *Handler) overviewLive(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	v, err := h.overviewData(r, id)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	h.renderFragment(w, "overview", "live", v)
}

func (h *Handler) services(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	var out struct {
		Services []map[string]any `json:"services"`
	}
	v := view{Title: "Services", Nav: "services", User: id, Flash: flash(r)}
	if err := h.get(r, id, "/admin/services", &out); err != nil {
		v.Error = err.Error()
	}
	var health struct {
		Services []healthService `json:"services"`
	}
	_ = h.get(r, id, "/admin/health", &health)
	byName := map[string]healthService{}
	for _, s := range health.Services {
		byName[s.Name] = s
	}
	type row struct {
		S map[string]any
		H healthService
	}
	rows := make([]row, len(out.Services))
	for i, s := range out.Services {
		name, _ := s["name"].(string)
		rows[i] = row{S: s, H: byName[name]}
	}
	v.Data = rows
	h.render(w, http.StatusOK, "services", v)
}

func (h *Handler) serviceForm(w http.ResponseWriter, status int, id auth.Identity, name string, vals map[string]string, errMsg string) {
	title := "New service"
	if name != "" {
		title = "Edit " + name
	}
	h.render(w, status, "service_form", view{Title: title, Nav: "services", User: id, Error: errMsg, Data: map[string]any{
		"Name": name, "Service": form{"svc", serviceFields, vals}, "Limits": form{"lim", limitFields, vals},
		"Policy": form{"pol", policyFields, vals},
	}})
}

// serviceForm returns the fields of the service form, after first.
func serviceForm(first ...field) []field {
	out := append(first, serviceFields...)
	out = append(out, policyFields...)
	return append(out, limitFields...)
}

func (h *Handler) serviceNew(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.serviceForm(w, http.StatusOK, id, "", map[string]string{"auth_scheme": "bearer", "is_active": "true"}, "")
}

func (h *Handler) serviceCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	_ = r.ParseForm()
	b := body(r, serviceForm(field{Name: "name", Kind: text}), false)
	res := h.call(r, id, http.MethodPost, "/admin/services", b)
	if !res.ok() {
		h.serviceForm(w, res.Status, id, "", formValues(r), res.errMessage())
		return
	}
	redirect(w, r, Prefix+"services/"+url.PathEscape(r.PostFormValue("name")), "Service created.")
}

func (h *Handler) serviceEdit(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	var s map[string]any
	if err := h.get(r, id, "/admin/services/"+url.PathEscape(name), &s); err != nil {
		h.render(w, http.StatusNotFound, "error", view{Title: "Not found", Nav: "services", User: id, Error: err.Error()})
		return
	}
	vals := values(s, serviceForm())
	h.serviceForm(w, http.StatusOK, id, name, vals, "")
}

func (h *Handler) serviceUpdate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	_ = r.ParseForm()
	b := body(r, serviceForm(), true)
	res := h.call(r, id, http.MethodPatch, "/admin/services/"+url.PathEscape(name), b)
	if !res.ok() {
		h.serviceForm(w, res.Status, id, name, formValues(r), res.errMessage())
		return
	}
	redirect(w, r, Prefix+"services/"+url.PathEscape(name), "Service saved.")
}

func (h *Handler) serviceDelete(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	res := h.call(r, id, http.MethodDelete, "/admin/services/"+url.PathEscape(name), nil)
	if !res.ok() {
		redirect(w, r, Prefix+"services/"+url.PathEscape(name), res.errMessage())
		return
	}
	redirect(w, r, Prefix+"services", "Service "+name+" deleted.")
}

// keyRow is a key of GET /admin/keys.
type keyRow struct {
	ID                 string     `json:"id"`
	Hint               string     `json:"hint"`
	State              string     `json:"state"`
	Breaker            string     `json:"breaker"`
	Reason             string     `json:"reason"`
	CooldownUntil      *time.Time `json:"cooldown_until"`
	InFlight           int64      `json:"in_flight"`
	RequestsLastMinute int        `json:"requests_last_minute"`
	Status             string     `json:"status"`
	StatusReason       string     `json:"status_reason"`
	RateLimitRPM       int        `json:"rate_limit_rpm"`
	BalanceTotal       float64    `json:"balance_total"`
	BalanceUsed        float64    `json:"balance_used"`
	BalanceUnit        string     `json:"balance_unit"`
	Origin             string     `json:"origin"`
	Tier               string     `json:"tier"`
	// Features is the use of each feature of the key's tier in the
	// current minute.
	Features map[string]struct {
		RPM  int `json:"rpm"`
		Used int `json:"used"`
	} `json:"features"`
	// RPM is the limit the bar is drawn against (the key's, else the
	// service's).
	RPM int `json:"-"`
}

// serviceData returns what the service page shows: the service, its
// keys and the data of its live keys table.
func (h *Handler) serviceData(r *http.Request, id auth.Identity, name string) (map[string]any, error) {
	var s map[string]any
	if err := h.get(r, id, "/admin/services/"+url.PathEscape(name), &s); err != nil {
		return nil, err
	}
	var ks struct {
		Keys []keyRow `json:"keys"`
	}
	if err := h.get(r, id, "/admin/keys?service="+url.QueryEscape(name), &ks); err != nil {
		return nil, err
	}
	var ts struct {
		Tiers []tierRow `json:"tiers"`
	}
	_ = h.get(r, id, "/admin/tiers", &ts)
	tiers := make([]string, len(ts.Tiers))
	for i, t := range ts.Tiers {
		tiers[i] = t.Name
	}
	showTiers := len(tiers) > 0
	svcRPM := int(num64(s["rate_limit_rpm"]))
	for i := range ks.Keys {
		ks.Keys[i].RPM = ks.Keys[i].RateLimitRPM
		if ks.Keys[i].RPM == 0 {
			ks.Keys[i].RPM = svcRPM
		}
		showTiers = showTiers || ks.Keys[i].Tier != ""
	}
	return map[string]any{"Service": s, "Name": name, "Keys": ks.Keys, "Tiers": tiers, "ShowTiers": showTiers}, nil
}

func num64(v any) float64 { f, _ := v.(float64); return f }

func (h *Handler) serviceDetail(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.showService(w, r, id, http.StatusOK, view{Flash: flash(r)})
}

// showService renders the service page, with v's messages and Lines.
func (h *Handler) showService(w http.ResponseWriter, r *http.Request, id auth.Identity, status int, v view) {
	name := r.PathValue("name")
	d, err := h.serviceData(r, id, name)
	if err != nil {
		h.render(w, http.StatusNotFound, "error", view{Title: "Not found", Nav: "services", User: id, Error: err.Error()})
		return
	}
	v.Title, v.Nav, v.User = name, "services", id
	d["KeyForm"] = form{"key", keyFields, map[string]string{}}
	v.Data = d
	h.render(w, status, "service", v)
}

func (h *Handler) serviceKeysLive(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	d, err := h.serviceData(r, id, r.PathValue("name"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	h.renderFragment(w, "service", "keys", view{User: id, Data: d})
}

func (h *Handler) keyCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	_ = r.ParseForm()
	b := body(r, keyFields, false)
	b["service"] = name
	b["key_value"] = strings.TrimSpace(r.PostFormValue("key_value"))
	res := h.call(r, id, http.MethodPost, "/admin/keys", b)
	if !res.ok() {
		h.showService(w, r, id, res.Status, view{Error: "Key not added: " + res.errMessage()})
		return
	}
	redirect(w, r, Prefix+"services/"+url.PathEscape(name), "Key added.")
}

func (h *Handler) keyImport(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	name := r.PathValue("name")
	res := h.call(r, id, http.MethodPost, "/admin/keys/import?service="+url.QueryEscape(name), r.PostFormValue("keys"))
	if !res.ok() {
		h.showService(w, r, id, res.Status, view{Error: "No key imported: " + res.errMessage(), Lines: res.lineErrors()})
		return
	}
	var out struct {
		Created int `json:"created"`
	}
	_ = res.decode(&out)
	redirect(w, r, Prefix+"services/"+url.PathEscape(name), plural(out.Created, "key")+" imported.")
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return num(n) + " " + what + "s"
}

func (h *Handler) keyStatus(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	kid, status := r.PathValue("id"), r.PostFormValue("status")
	back := Prefix + "services/" + url.PathEscape(r.PostFormValue("service"))
	res := h.call(r, id, http.MethodPatch, "/admin/keys/"+url.PathEscape(kid), map[string]any{"status": status})
	if !res.ok() {
		redirect(w, r, back, res.errMessage())
		return
	}
	redirect(w, r, back, "Key "+kid+" is now "+status+".")
}

func (h *Handler) keyDelete(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	kid := r.PathValue("id")
	back := Prefix + "services/" + url.PathEscape(r.PostFormValue("service"))
	res := h.call(r, id, http.MethodDelete, "/admin/keys/"+url.PathEscape(kid), nil)
	if !res.ok() {
		redirect(w, r, back, res.errMessage())
		return
	}
	redirect(w, r, back, "Key "+kid+" deleted.")
}
