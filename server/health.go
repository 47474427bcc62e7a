package server

import (
	"context"
	"net/http"
	"time"

	"github.com/keypool/keypool/internal/httpx"
)

// healthz serves GET /healthz: the process is alive.
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	httpx.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

type readiness struct {
	Status   string `json:"status"`
	Services int    `json:"services"`
	Keys     int    `json:"keys"`
	External string `json:"external_error,omitempty"`
}

// readyz serves GET /readyz: 200 when the store answers and the pool is
// loaded, 503 unavailable with the reason otherwise (also while shutting
// down, so load balancers stop sending traffic).
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	reason := ""
	st := s.syncer.Status()
	switch {
	case s.draining.Load():
		reason = "shutting down"
	case !st.Loaded:
		reason = "pools not loaded yet"
	default:
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		err := s.st.Ping(ctx)
		cancel()
		if err != nil {
			reason = "store unreachable"
		} else if !st.Ready {
			reason = "store sync failing"
		}
	}
	if reason != "" {
		s.fail(w, r, httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable, "not ready: %s", reason))
		return
	}
	httpx.WriteJSON(w, http.StatusOK, readiness{Status: "ready", Services: st.Services, Keys: st.Keys, External: st.ExternalError})
}
