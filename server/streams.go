package server

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/store"
)

// Revocation of what is open.
//
// Every proxied request of a client token is registered in openCalls from
// the moment it is authorized until it ends, under its token, team and
// user, and under its key once the upstream answered. Ending one cancels
// its context with an *httpx.Error cause, which the proxy turns into the
// answer the response allows (see the proxy): a JSON error before
// the response started, a final SSE error event, a WebSocket close frame
// (1008 for a revoked client, 1013 for a disabled key).
//
// What triggers it:
//
//   - every invalidation of the auth cache (auth.Config.OnInvalidate):
//     the admin API's token, team and user changes, and whatever change
//     channel feeds the cache from other replicas. The token, its user
//     and its team are read again from the store; open calls whose token
//     is gone, revoked or expired, whose user or team is gone, or whose
//     team may no longer use the service are ended;
//   - every reload of services and keys (an admin change here, or a store
//     version change seen by the periodic check): open calls served by a
//     key that is gone or disabled are ended.
//
// On the replica that served the admin call this happens before the
// admin call answers; the rest of the bound is the proxy's: at most one
// upstream read for SSE, one frame boundary for WebSockets. Other
// replicas follow their change channel (store version checks every
// SyncInterval today).

// openCall is one proxied request under way.
type openCall struct {
	tokenID, teamID, userID, service string
	rec                              *proxy.Record // Stop ends the request
	keyID                            string        // protected by openCalls.mu
}

// stop ends the call's request with cause (see proxy.Record.Stop).
func (c *openCall) stop(cause error) { c.rec.Stop(cause) }

// openCalls indexes the open calls of this replica. It is safe for
// concurrent use; stop functions run outside its lock.
type openCalls struct {
	mu      sync.Mutex // protects the maps and openCall.keyID
	byToken map[string]map[*openCall]struct{}
	byTeam  map[string]map[*openCall]struct{}
	byUser  map[string]map[*openCall]struct{}
	byKey   map[string]map[*openCall]struct{}
}

func index(m *map[string]map[*openCall]struct{}, id string, c *openCall) {
	if id == "" {
		return
	}
	if *m == nil {
		*m = map[string]map[*openCall]struct{}{}
	}
	set := (*m)[id]
	if set == nil {
		set = map[*openCall]struct{}{}
		(*m)[id] = set
	}
	set[c] = struct{}{}
}

// unindex removes c from id's set. An emptied set is kept for id's next
// call (the sets are bounded by the tokens, teams, users and keys there
// are), so that a steady client does not allocate one per request.
func unindex(m map[string]map[*openCall]struct{}, id string, c *openCall) {
	if set := m[id]; set != nil {
		delete(set, c)
	}
}

func (o *openCalls) add(c *openCall) {
	o.mu.Lock()
	index(&o.byToken, c.tokenID, c)
	index(&o.byTeam, c.teamID, c)
	index(&o.byUser, c.userID, c)
	o.mu.Unlock()
}

// setKey files c under the key that serves it.
func (o *openCalls) setKey(c *openCall, keyID string) {
	o.mu.Lock()
	if c.keyID != keyID {
		unindex(o.byKey, c.keyID, c)
		c.keyID = keyID
		index(&o.byKey, keyID, c)
	}
	o.mu.Unlock()
}

func (o *openCalls) remove(c *openCall) {
	o.mu.Lock()
	unindex(o.byToken, c.tokenID, c)
	unindex(o.byTeam, c.teamID, c)
	unindex(o.byUser, c.userID, c)
	unindex(o.byKey, c.keyID, c)
	o.mu.Unlock()
}

// list returns the open calls under scope ("token", "team", "user",
// "all") and id.
func (o *openCalls) list(scope, id string) []*openCall {
	o.mu.Lock()
	defer o.mu.Unlock()
	var set map[string]map[*openCall]struct{}
	switch scope {
	case "token":
		set = o.byToken
	case "team":
		set = o.byTeam
	case "user":
		set = o.byUser
	case "all":
		var out []*openCall
		for _, s := range o.byToken {
			for c := range s {
				out = append(out, c)
			}
		}
		return out
	}
	out := make([]*openCall, 0, len(set[id]))
	for c := range set[id] {
		out = append(out, c)
	}
	return out
}

// byKeys returns the open calls filed under a key, by key id.
func (o *openCalls) byKeys() map[string][]*openCall {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make(map[string][]*openCall, len(o.byKey))
	for id, set := range o.byKey {
		for c := range set {
			out[id] = append(out[id], c)
		}
	}
	return out
}

// onInvalidate is the auth cache's OnInvalidate hook: it ends the open
// calls of a token, team or user that no longer may make them.
func (s *Server) onInvalidate(scope, id string) {
	if s.authSync != nil {
		s.authSync.offer(scope, id)
	}
	calls := s.open.list(scope, id)
	if len(calls) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	verdicts := map[string]*verdict{} // by token id
	ended := 0
	for _, c := range calls {
		v, ok := verdicts[c.tokenID]
		if !ok {
			var err error
			if v, err = s.recheck(ctx, c); err != nil {
				s.log.Warn("cannot re-check the open requests of a changed token; they go on", "token_id", c.tokenID, "err", err)
			}
			verdicts[c.tokenID] = v
		}
		switch {
		case v == nil:
		case v.err != nil:
			c.stop(v.err)
			ended++
		case len(v.allowed) > 0 && !slices.Contains(v.allowed, c.service):
			c.stop(httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "team %q may no longer use service %q", v.team, c.service))
			ended++
		}
	}
	if ended > 0 {
		s.log.Info("ended open requests of a revoked client", "scope", scope, "id", id, "ended", ended)
		s.metrics.streamsEnded.Add(float64(ended))
	}
}

// verdict is what a re-check found about a token: err says why it may no
// longer be used; otherwise allowed lists the services its team may use
// (empty: all).
type verdict struct {
	err     *httpx.Error
	team    string
	allowed []string
}

// recheck reads c's token, its user and its team from the store again;
// an error means the store could not tell.
func (s *Server) recheck(ctx context.Context, c *openCall) (*verdict, error) {
	gone := func(what string) *verdict {
		return &verdict{err: httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "%s", what)}
	}
	tok, err := s.st.GetToken(ctx, c.tokenID)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return gone("token revoked: deleted"), nil
	case err != nil:
		return nil, err
	case !tok.IsActive:
		return gone("token revoked"), nil
	case tok.ExpiresAt != nil && !s.now().Before(*tok.ExpiresAt):
		return gone("token expired"), nil
	}
	teamID := tok.TeamID
	if tok.UserID != "" {
		u, err := s.st.GetUser(ctx, tok.UserID)
		switch {
		case errors.Is(err, store.ErrNotFound):
			return gone("token revoked: its user was removed"), nil
		case err != nil:
			return nil, err
		}
		teamID = u.TeamID
	}
	team, err := s.st.GetTeam(ctx, teamID)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return gone("token revoked: its team was removed"), nil
	case err != nil:
		return nil, err
	case teamID != c.teamID:
		return gone("token revoked: it moved to another team"), nil
	}
	return &verdict{team: team.Name, allowed: team.AllowedServices}, nil
}

// errKeyDisabled ends the open calls of a key taken out of rotation.
var errKeyDisabled = httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable,
	"the upstream key serving this stream was disabled or removed; retry")

// sweepKeys ends the open calls served by keys that are gone from the
// pool or disabled. It runs after every reload of services and keys.
func (s *Server) sweepKeys() {
	open := s.open.byKeys()
	if len(open) == 0 {
		return
	}
	live := map[string]keypool.State{}
	for _, svc := range s.pool.Services() {
		stats, _ := s.pool.Stats(svc)
		for _, k := range stats {
			live[k.ID] = k.State
		}
	}
	ended := 0
	for id, calls := range open {
		if st, ok := live[id]; ok && st != keypool.StateDisabled {
			continue
		}
		for _, c := range calls {
			c.stop(errKeyDisabled)
			ended++
		}
	}
	if ended > 0 {
		s.log.Info("ended open requests of disabled or removed keys", "ended", ended)
		s.metrics.streamsEnded.Add(float64(ended))
	}
}
