package server

import (
	"net/http"
	"slices"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
)

// clientService is one entry of GET /services.
type clientService struct {
	Name        string        `json:"name"`
	Description string        `json:"description"`
	Models      []clientModel `json:"models"`
}

// clientModel is a model a client may call, with its description from the
// price (model) table.
type clientModel struct {
	ID          string `json:"id"`
	Description string `json:"description"`
}

// listServices serves GET /services for a client token: the services the
// caller may use (its team's allowed services that are active), each with
// the models it may call there — the service's models_enabled narrowed by
// the team's and the token's (without a service list, the token's list,
// else the team's; for a router, its exact routes those lists allow) —
// described from the price table.
func (s *Server) listServices(w http.ResponseWriter, r *http.Request) {
	cred, err := proxy.Credential(r)
	if err != nil {
		writeError(w, err)
		return
	}
	p, err := s.authenticate(r, cred, false)
	if err != nil {
		writeError(w, err)
		return
	}
	if ri := infoFrom(r.Context()); ri != nil {
		ri.teamID, ri.tokenID = p.Team.ID, p.Token.ID
	}
	names := s.pool.Services()
	slices.Sort(names)
	out := make([]clientService, 0, len(names))
	for _, name := range names {
		meta := s.meta(name)
		if meta.disabled || !p.AllowsService(name) {
			continue
		}
		cs := clientService{Name: name, Description: meta.description, Models: []clientModel{}}
		models := clientModels(p, meta.limits.ModelsEnabled)
		if t, ok := s.routes.Router(name); ok {
			models = s.routerModels(p, name, t)
		}
		for _, m := range models {
			pr, _ := meta.prices.Lookup(m)
			cs.Models = append(cs.Models, clientModel{ID: m, Description: pr.Description})
		}
		out = append(out, cs)
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"services": out})
}

// clientModels returns the models p may call on a service whose allow-list
// is enabled (all models when empty).
func clientModels(p *auth.Principal, enabled []string) []string {
	base := enabled
	if len(base) == 0 {
		base = p.Token.ModelsEnabled
	}
	if len(base) == 0 {
		base = p.Team.ModelsEnabled
	}
	var out []string
	for _, m := range base {
		if p.AllowsModel(m) && (len(enabled) == 0 || slices.Contains(enabled, m)) {
			out = append(out, m)
		}
	}
	return out
}
