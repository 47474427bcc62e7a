package server

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store/sqlstore"
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
	// Degraded says what works from a last good copy while the replica
	// still serves (a failing background sync); it does not fail /readyz.
	Degraded string `json:"degraded,omitempty"`
}

// prober is a store that tells a read-only database from a reachable
// one (sqlstore does); other stores are asked with Ping.
type prober interface {
	Probe(ctx context.Context) error
}

// readyz serves GET /readyz: 200 when the store answers a query now (and,
// on PostgreSQL, takes writes) and the pool is loaded; 503 unavailable
// with the reason otherwise (also while shutting down, so load balancers
// stop sending traffic). It asks the store rather than trusting the last
// poll: a connection the database closed and the pool reopened at once
// does not flip it, a read-only database (a standby, a failover in
// progress: writes fail with SQLSTATE 25006) does.
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
		var err error
		if p, ok := s.st.(prober); ok {
			err = p.Probe(ctx)
		} else {
			err = s.st.Ping(ctx)
		}
		cancel()
		switch {
		case errors.Is(err, sqlstore.ErrReadOnly):
			reason = "store is read-only (writes fail): " + strings.TrimPrefix(err.Error(), sqlstore.ErrReadOnly.Error()+" ")
		case err != nil:
			reason = "store unreachable"
		}
	}
	if reason != "" {
		s.fail(w, r, httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable, "not ready: %s", reason))
		return
	}
	rd := readiness{Status: "ready", Services: st.Services, Keys: st.Keys, External: st.ExternalError}
	if !st.Ready {
		rd.Degraded = "store sync failing; serving the last loaded services and keys"
	}
	if d := s.redisDegraded(); d != "" {
		if rd.Degraded != "" {
			rd.Degraded += "; "
		}
		rd.Degraded += d
	}
	httpx.WriteJSON(w, http.StatusOK, rd)
}
