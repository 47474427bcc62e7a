package admin

import (
	"net/http"
	"sort"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
)

// stateNames are the states GET /admin/health counts, always all present.
var stateNames = []string{"active", "cooling", "open", "invalid", "exhausted", "disabled"}

// healthKey is one key's live figures in GET /admin/health.
type healthKey struct {
	ID                 string `json:"id"`
	Hint               string `json:"hint"`
	State              string `json:"state"`
	Breaker            string `json:"breaker,omitempty"`
	InFlight           int64  `json:"in_flight"`
	RequestsLastMinute int    `json:"requests_last_minute"`
}

// healthService is one service in GET /admin/health.
type healthService struct {
	Name string `json:"name"`
	// Loaded reports whether the pool serves the service.
	Loaded             bool           `json:"loaded"`
	Keys               int            `json:"keys"`
	States             map[string]int `json:"states"`
	Available          int            `json:"available"`
	InFlight           int64          `json:"in_flight"`
	RequestsLastMinute int            `json:"requests_last_minute"`
	KeyStats           []healthKey    `json:"key_stats"`
}

// healthBody is the answer of GET /admin/health.
type healthBody struct {
	// Status is "ok", or "degraded" when the store cannot be read or a
	// service has no available key.
	Status   string          `json:"status"`
	StoreOK  bool            `json:"store_ok"`
	Services []healthService `json:"services"`
}

// health handles GET /admin/health: per service, key counts by state and
// live requests per minute per key, from the pool. It answers from the
// pool alone when the store is down.
func (a *API) health(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	body := healthBody{Status: "ok", StoreOK: true, Services: []healthService{}}
	names := map[string]bool{}
	if ss, err := a.st.Services(r.Context()); err != nil {
		body.StoreOK, body.Status = false, "degraded"
		a.log.WarnContext(r.Context(), "admin: health: store unreadable", "err", err.Error())
	} else {
		for _, s := range ss {
			names[s.Name] = true
		}
	}
	if a.pool != nil {
		for _, n := range a.pool.Services() {
			names[n] = true
		}
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for _, n := range sorted {
		hs := healthService{Name: n, States: make(map[string]int, len(stateNames)), KeyStats: []healthKey{}}
		for _, s := range stateNames {
			hs.States[s] = 0
		}
		var stats []keypool.KeyStats
		if a.pool != nil {
			stats, hs.Loaded = a.pool.Stats(n)
		}
		for _, k := range stats {
			st := liveState(k)
			hs.States[st]++
			if k.State == keypool.StateActive || k.State == keypool.StateHalfOpen {
				hs.Available++
			}
			hs.InFlight += k.InFlight
			hs.RequestsLastMinute += k.RequestsLastMinute
			hs.KeyStats = append(hs.KeyStats, healthKey{
				ID: k.ID, Hint: k.Hint, State: st, Breaker: k.Breaker,
				InFlight: k.InFlight, RequestsLastMinute: k.RequestsLastMinute,
			})
		}
		hs.Keys = len(stats)
		if hs.Keys > 0 && hs.Available == 0 {
			body.Status = "degraded"
		}
		body.Services = append(body.Services, hs)
	}
	httpx.WriteJSON(w, http.StatusOK, body)
	return nil
}
