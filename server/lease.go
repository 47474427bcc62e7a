package server

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/store"
)

// leaseBook holds the keys leased by GET /key until their report, or
// until their TTL passes (then they are returned as Canceled, which says
// nothing about the key). While a lease is held its key counts one
// request in flight.
type leaseBook struct {
	ttl time.Duration
	now func() time.Time

	mu    sync.Mutex // protects byKey
	byKey map[string][]*heldLease
}

type heldLease struct {
	lease   keypool.Lease
	service string
	holder  string // token id, or "admin"
	expires time.Time
}

func newLeaseBook(ttl time.Duration, now func() time.Time) *leaseBook {
	return &leaseBook{ttl: ttl, now: now, byKey: map[string][]*heldLease{}}
}

func (b *leaseBook) put(l keypool.Lease, service, holder string) {
	h := &heldLease{lease: l, service: service, holder: holder, expires: b.now().Add(b.ttl)}
	b.mu.Lock()
	b.byKey[l.KeyID()] = append(b.byKey[l.KeyID()], h)
	b.mu.Unlock()
}

// take removes and returns the oldest lease on keyID held by holder, or,
// for the admin, by anyone.
func (b *leaseBook) take(keyID, holder string) *heldLease {
	b.mu.Lock()
	defer b.mu.Unlock()
	list := b.byKey[keyID]
	for i, h := range list {
		if h.holder == holder || holder == "admin" {
			list = append(list[:i:i], list[i+1:]...)
			if len(list) == 0 {
				delete(b.byKey, keyID)
			} else {
				b.byKey[keyID] = list
			}
			return h
		}
	}
	return nil
}

// expire returns every lease whose TTL has passed.
func (b *leaseBook) expire() {
	now := b.now()
	var old []*heldLease
	b.mu.Lock()
	for id, list := range b.byKey {
		keep := list[:0]
		for _, h := range list {
			if now.After(h.expires) {
				old = append(old, h)
			} else {
				keep = append(keep, h)
			}
		}
		if len(keep) == 0 {
			delete(b.byKey, id)
		} else {
			b.byKey[id] = keep
		}
	}
	b.mu.Unlock()
	for _, h := range old {
		h.lease.Release(keypool.Outcome{Kind: keypool.Canceled, Reason: "lease expired without a report"})
	}
}

// releaseAll returns every lease (at shutdown).
func (b *leaseBook) releaseAll() {
	b.mu.Lock()
	all := b.byKey
	b.byKey = map[string][]*heldLease{}
	b.mu.Unlock()
	for _, list := range all {
		for _, h := range list {
			h.lease.Release(keypool.Outcome{Kind: keypool.Canceled, Reason: "shutdown"})
		}
	}
}

func (b *leaseBook) run(ctx context.Context) {
	every := min(max(b.ttl/10, time.Second), 30*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.expire()
		}
	}
}

// leaseAuth authenticates a lease endpoint caller: the admin token, or a
// client token with the lease scope.
func (s *Server) leaseAuth(r *http.Request) (*auth.Principal, string, error) {
	cred, err := proxy.Credential(r)
	if err != nil {
		return nil, "", err
	}
	p, err := s.authenticate(r, cred, true)
	if err != nil {
		return nil, "", err
	}
	if p.Admin {
		return p, "admin", nil
	}
	if !p.HasScope(auth.ScopeLease) {
		return nil, "", httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
			"this token may not lease keys: create a token with \"scopes\":[\"lease\"]")
	}
	if ri := infoFrom(r.Context()); ri != nil {
		ri.teamID, ri.tokenID = p.Team.ID, p.Token.ID
	}
	return p, p.Token.ID, nil
}

type leaseResponse struct {
	KeyID   string `json:"key_id"`
	Service string `json:"service"`
	Value   string `json:"value"`
}

// leaseKey serves GET /key?service=…[&feature=…].
func (s *Server) leaseKey(w http.ResponseWriter, r *http.Request) {
	if err := s.serveLease(w, r); err != nil {
		s.fail(w, r, err)
	}
}

func (s *Server) serveLease(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet { // not HEAD: a lease would be taken and never delivered
		w.Header().Set("Allow", "GET")
		return httpx.Errorf(http.StatusMethodNotAllowed, httpx.CodeMethodNotAllowed, "use GET /key?service=...")
	}
	p, holder, err := s.leaseAuth(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	service, feature := strings.TrimSpace(q.Get("service")), strings.TrimSpace(q.Get("feature"))
	if service == "" {
		return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "query parameter service is required")
	}
	if ri := infoFrom(r.Context()); ri != nil {
		ri.service = service
	}
	if _, ok := s.pool.Service(service); !ok {
		s.metrics.leases.WithLabelValues("unknown", httpx.CodeUnknownService).Inc()
		return httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service)
	}
	if err := s.admit(r.Context(), p, service); err != nil {
		return err
	}
	l, err := s.pool.Acquire(service, keypool.Request{Feature: feature})
	if err != nil {
		var ue *keypool.UnavailableError
		if errors.As(err, &ue) {
			s.metrics.leases.WithLabelValues(service, httpx.CodeUpstreamUnavailable).Inc()
			e := httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUpstreamUnavailable, "upstream of service %q unavailable (%s)", service, ue.Reason)
			e.RetryAfter = ue.RetryAfter
			return e
		}
		var nk *keypool.NoKeyError
		if errors.As(err, &nk) {
			s.metrics.leases.WithLabelValues(service, httpx.CodeNoKeyAvailable).Inc()
			msg := "no key available for service %q"
			args := []any{service}
			if feature != "" {
				msg += " and feature %q"
				args = append(args, feature)
			}
			if nk.Reason != "" {
				msg += " (%s)"
				args = append(args, nk.Reason)
			}
			e := httpx.Errorf(http.StatusTooManyRequests, httpx.CodeNoKeyAvailable, msg, args...)
			e.RetryAfter = nk.RetryAfter
			return e
		}
		return err
	}
	s.leases.put(l, service, holder)
	s.metrics.leases.WithLabelValues(service, "ok").Inc()
	if ri := infoFrom(r.Context()); ri != nil {
		ri.keyID = l.KeyID()
	}
	s.usage.Add(store.UsageRecord{
		Time: s.now().UTC(), RequestID: RequestID(r.Context()),
		TeamID: p.Team.ID, TokenID: p.Token.ID, Service: service, KeyID: l.KeyID(), Status: http.StatusOK,
	})
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(proxy.HeaderKeyID, l.KeyID())
	httpx.WriteJSON(w, http.StatusOK, leaseResponse{KeyID: l.KeyID(), Service: service, Value: l.Secret().Reveal()})
	return nil
}

type reportRequest struct {
	Outcome    string   `json:"outcome"`
	RetryAfter *float64 `json:"retry_after"`
}

type reportResponse struct {
	KeyID   string `json:"key_id"`
	Service string `json:"service"`
	Outcome string `json:"outcome"`
	State   string `json:"state"`
}

// reportKey serves POST /key/{key_id}/report.
func (s *Server) reportKey(w http.ResponseWriter, r *http.Request) {
	if err := s.serveReport(w, r); err != nil {
		s.fail(w, r, err)
	}
}

func (s *Server) serveReport(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		return httpx.Errorf(http.StatusMethodNotAllowed, httpx.CodeMethodNotAllowed, "use POST /key/{key_id}/report")
	}
	p, holder, err := s.leaseAuth(r)
	if err != nil {
		return err
	}
	var req reportRequest
	if err := httpx.DecodeJSON(w, r, &req, 0); err != nil {
		return err
	}
	kind, err := keypool.ParseOutcomeKind(req.Outcome)
	if err != nil || kind > keypool.Failure {
		return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
			"field \"outcome\" must be one of ok, rate_limited, invalid, exhausted, error")
	}
	var retry time.Duration
	if req.RetryAfter != nil {
		if *req.RetryAfter < 0 || *req.RetryAfter > 7*24*3600 {
			return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "field \"retry_after\" must be seconds between 0 and 604800")
		}
		retry = time.Duration(*req.RetryAfter * float64(time.Second))
	}
	keyID := r.PathValue("id")
	if ri := infoFrom(r.Context()); ri != nil {
		ri.keyID = keyID
	}
	s.metrics.reports.WithLabelValues(kind.String()).Inc()
	o := keypool.Outcome{Kind: kind, RetryAfter: retry, Reason: "reported: " + kind.String()}
	var service string
	if h := s.leases.take(keyID, holder); h != nil {
		service = h.service
		h.lease.Release(o)
	} else {
		// No lease outstanding (expired, or the key was used without
		// one): apply what the state machine would.
		service = s.findKey(keyID)
		if service == "" || !p.Admin && !p.AllowsService(service) {
			// A team may report only on keys of services it may use.
			return httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "no key %q", keyID)
		}
		s.pool.Report(service, keyID, o)
	}
	if ri := infoFrom(r.Context()); ri != nil {
		ri.service = service
	}
	state := ""
	if stats, ok := s.pool.Stats(service); ok {
		for _, k := range stats {
			if k.ID == keyID {
				state = k.State.String()
			}
		}
	}
	httpx.WriteJSON(w, http.StatusOK, reportResponse{KeyID: keyID, Service: service, Outcome: kind.String(), State: state})
	return nil
}

// findKey returns the service holding keyID, or "".
func (s *Server) findKey(keyID string) string {
	for _, svc := range s.pool.Services() {
		stats, _ := s.pool.Stats(svc)
		for _, k := range stats {
			if k.ID == keyID {
				return svc
			}
		}
	}
	return ""
}

// fail writes err and notes its code for the access log.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var e *httpx.Error
	if errors.As(err, &e) {
		if ri := infoFrom(r.Context()); ri != nil {
			ri.code = e.Code
		}
	} else if r.Context().Err() == nil {
		s.log.Error("request failed", "request_id", RequestID(r.Context()), "path", safePath(r.URL.Path), "err", err)
	}
	writeError(w, err)
}
