package console

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/keypool/keypool/auth"
)

func (h *Handler) audit(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	v := view{Title: "Audit log", Nav: "audit", User: id}
	q := url.Values{"limit": {"200"}}
	for _, k := range []string{"actor", "action", "target"} {
		if x := strings.TrimSpace(r.URL.Query().Get(k)); x != "" {
			q.Set(k, x)
		}
	}
	var out struct {
		Entries []map[string]any `json:"entries"`
	}
	if err := h.get(r, id, "/admin/audit?"+q.Encode(), &out); err != nil {
		v.Error = err.Error()
	}
	v.Data = map[string]any{"Entries": out.Entries, "Filters": map[string]string{"actor": q.Get("actor"), "action": q.Get("action"), "target": q.Get("target")}}
	status := http.StatusOK
	if v.Error != "" && !id.IsAdmin() {
		status = http.StatusForbidden
	}
	h.render(w, status, "audit", v)
}

func (h *Handler) adminUsers(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	h.showAdminUsers(w, r, id, http.StatusOK, view{Flash: flash(r)})
}

func (h *Handler) showAdminUsers(w http.ResponseWriter, r *http.Request, id auth.Identity, status int, v view) {
	var out struct {
		Users []map[string]any `json:"admin_users"`
	}
	if err := h.get(r, id, "/admin/admin-users", &out); err != nil && v.Error == "" {
		v.Error = err.Error()
		if !id.IsAdmin() {
			status = http.StatusForbidden
		}
	}
	v.Title, v.Nav, v.User = "Admin users", "admin-users", id
	v.Data = map[string]any{"Users": out.Users}
	h.render(w, status, "admin_users", v)
}

func (h *Handler) adminUserCreate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	b := map[string]any{"username": strings.TrimSpace(r.PostFormValue("username")), "password": r.PostFormValue("password"), "role": r.PostFormValue("role")}
	res := h.call(r, id, http.MethodPost, "/admin/admin-users", b)
	if !res.ok() {
		h.showAdminUsers(w, r, id, res.Status, view{Error: res.errMessage()})
		return
	}
	redirect(w, r, Prefix+"admin-users", "Admin user created.")
}

func (h *Handler) adminUserUpdate(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	uid := r.PathValue("id")
	b := map[string]any{}
	switch r.PostFormValue("action") {
	case "disable":
		b["disabled"] = true
	case "enable":
		b["disabled"] = false
	case "role":
		b["role"] = r.PostFormValue("role")
	case "password":
		b["password"] = r.PostFormValue("password")
	case "delete":
		res := h.call(r, id, http.MethodDelete, "/admin/admin-users/"+url.PathEscape(uid), nil)
		if !res.ok() {
			h.showAdminUsers(w, r, id, res.Status, view{Error: res.errMessage()})
			return
		}
		redirect(w, r, Prefix+"admin-users", "Admin user deleted.")
		return
	}
	res := h.call(r, id, http.MethodPatch, "/admin/admin-users/"+url.PathEscape(uid), b)
	if !res.ok() {
		h.showAdminUsers(w, r, id, res.Status, view{Error: res.errMessage()})
		return
	}
	redirect(w, r, Prefix+"admin-users", "Admin user saved.")
}
