package console

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/keypool/keypool/auth"
)

// teamFields are the team form's fields besides its limits.
var teamFields = []field{
	{"name", "Name", text, ""},
	{"description", "Description", text, ""},
	{"allowed_services", "Allowed services", list, "comma-separated; empty = every service"},
}

// tokenFields are the token form's fields besides its limits.
var tokenFields = []field{
	{"name", "Name", text, "what the token is for, e.g. dev-laptop"},
	{"description", "Description", text, ""},
	{"expires_at", "Expires at", text, "RFC 3339, e.g. 2026-12-31T00:00:00Z; empty = never"},
}

func (h *Handler) teams(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.showTeams(w, r, id, http.StatusOK, view{Flash: flash(r)}, map[string]string{})
}

func (h *Handler) showTeams(w http.ResponseWriter, r *http.Request, id auth.Identity, status int, v view, vals map[string]string) {
	var ts struct {
		Teams []map[string]any `json:"teams"`
	}
	if err := h.get(r, id, "/admin/teams", &ts); err != nil && v.Error == "" {
		v.Error = err.Error()
	}
	var toks struct {
		Tokens []map[string]any `json:"tokens"`
	}
	_ = h.get(r, id, "/admin/tokens", &toks)
	counts := map[string]int{}
	for _, t := range toks.Tokens {
		if tid, _ := t["team_id"].(string); tid != "" && t["is_active"] == true {
			counts[tid]++
		}
	}
	v.Title, v.Nav, v.User = "Teams and tokens", "teams", id
	v.Data = map[string]any{"Teams": ts.Teams, "TokenCounts": counts, "Form": form{"team", teamFields, vals}, "Limits": form{"tlim", limitFields, vals}}
	h.render(w, status, "teams", v)
}

func (h *Handler) teamCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	_ = r.ParseForm()
	res := h.call(r, id, http.MethodPost, "/admin/teams", body(r, append(append([]field{}, teamFields...), limitFields...), false))
	if !res.ok() {
		h.showTeams(w, r, id, res.Status, view{Error: res.errMessage()}, formValues(r))
		return
	}
	var t struct {
		ID string `json:"id"`
	}
	_ = res.decode(&t)
	redirect(w, r, Prefix+"teams/"+url.PathEscape(t.ID), "Team created.")
}

func (h *Handler) teamDetail(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.showTeam(w, r, id, http.StatusOK, view{Flash: flash(r)}, nil)
}

// showTeam renders a team's page: its settings, users and tokens, and
// (newToken) a token created just now, shown this once.
func (h *Handler) showTeam(w http.ResponseWriter, r *http.Request, id auth.Identity, status int, v view, extra map[string]any) {
	tid := r.PathValue("id")
	var t map[string]any
	if err := h.get(r, id, "/admin/teams/"+url.PathEscape(tid), &t); err != nil {
		h.render(w, http.StatusNotFound, "error", view{Title: "Not found", Nav: "teams", User: id, Error: err.Error()})
		return
	}
	var us struct {
		Users []map[string]any `json:"users"`
	}
	_ = h.get(r, id, "/admin/users?team_id="+url.QueryEscape(tid), &us)
	var toks struct {
		Tokens []map[string]any `json:"tokens"`
	}
	_ = h.get(r, id, "/admin/tokens?team_id="+url.QueryEscape(tid), &toks)
	vals := values(t, teamFields)
	for k, x := range values(t, limitFields) {
		vals[k] = x
	}
	if ev, ok := extra["Values"].(map[string]string); ok {
		vals = ev
	}
	name, _ := t["name"].(string)
	v.Title, v.Nav, v.User = name, "teams", id
	data := map[string]any{"Team": t, "ID": tid, "Users": us.Users, "Tokens": toks.Tokens,
		"Form": form{"team", teamFields, vals}, "Limits": form{"tlim", limitFields, vals},
		"TokenForm": form{"tok", tokenFields, map[string]string{}}, "TokenLimits": form{"toklim", limitFields, map[string]string{}}}
	for k, x := range extra {
		data[k] = x
	}
	v.Data = data
	h.render(w, status, "team", v)
}

func (h *Handler) teamUpdate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	tid := r.PathValue("id")
	_ = r.ParseForm()
	res := h.call(r, id, http.MethodPatch, "/admin/teams/"+url.PathEscape(tid), body(r, append(append([]field{}, teamFields...), limitFields...), true))
	if !res.ok() {
		h.showTeam(w, r, id, res.Status, view{Error: res.errMessage()}, map[string]any{"Values": formValues(r)})
		return
	}
	redirect(w, r, Prefix+"teams/"+url.PathEscape(tid), "Team saved.")
}

func (h *Handler) teamDelete(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	tid := r.PathValue("id")
	res := h.call(r, id, http.MethodDelete, "/admin/teams/"+url.PathEscape(tid), nil)
	if !res.ok() {
		redirect(w, r, Prefix+"teams/"+url.PathEscape(tid), res.errMessage())
		return
	}
	redirect(w, r, Prefix+"teams", "Team deleted, with its users and tokens.")
}

func (h *Handler) userCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	tid := r.PathValue("id")
	res := h.call(r, id, http.MethodPost, "/admin/users", map[string]any{"external_id": strings.TrimSpace(r.PostFormValue("external_id")), "team_id": tid})
	if !res.ok() {
		h.showTeam(w, r, id, res.Status, view{Error: "User not added: " + res.errMessage()}, nil)
		return
	}
	redirect(w, r, Prefix+"teams/"+url.PathEscape(tid), "User added.")
}

func (h *Handler) userDelete(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	back := Prefix + "teams/" + url.PathEscape(r.PostFormValue("team_id"))
	res := h.call(r, id, http.MethodDelete, "/admin/users/"+url.PathEscape(r.PathValue("id")), nil)
	if !res.ok() {
		redirect(w, r, back, res.errMessage())
		return
	}
	redirect(w, r, back, "User deleted, with its tokens.")
}

func (h *Handler) tokenCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	tid := r.PathValue("id")
	_ = r.ParseForm()
	b := body(r, append(append([]field{}, tokenFields...), limitFields...), false)
	if u := r.PostFormValue("user_id"); u != "" {
		b["user_id"] = u
	} else {
		b["team_id"] = tid
	}
	if r.PostFormValue("scope_lease") != "" {
		b["scopes"] = []string{"lease"}
	}
	res := h.call(r, id, http.MethodPost, "/admin/tokens", b)
	if !res.ok() {
		h.showTeam(w, r, id, res.Status, view{Error: "Token not created: " + res.errMessage()}, nil)
		return
	}
	var created struct {
		ID     string `json:"id"`
		Token  string `json:"token"`
		Prefix string `json:"prefix"`
		Name   string `json:"name"`
	}
	_ = res.decode(&created)
	// The one showing of the token: this answer is never cached, and the
	// token is not in any URL.
	h.showTeam(w, r, id, http.StatusCreated, view{}, map[string]any{"NewToken": created})
}

func (h *Handler) tokenRevoke(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	back := Prefix + "teams/" + url.PathEscape(r.PostFormValue("team_id"))
	res := h.call(r, id, http.MethodPatch, "/admin/tokens/"+url.PathEscape(r.PathValue("id")), map[string]any{"is_active": false})
	if !res.ok() {
		redirect(w, r, back, res.errMessage())
		return
	}
	redirect(w, r, back, "Token revoked.")
}
