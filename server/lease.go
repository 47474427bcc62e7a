package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/store"
)

// Lease error codes of POST /key/{key_id}/report.
const (
	codeLeaseNotFound = "lease_not_found"
	codeLeaseExpired  = "lease_expired"
	codeLeaseReported = "lease_reported"
)

// leaseBook holds the keys leased by GET /key, by lease id, until their
// report or until their TTL passes (then they are returned as Canceled,
// which says nothing about the key). While a lease is held its key counts
// one request in flight. A lease that was reported or expired is
// remembered for one more TTL, so that a late or repeated report is told
// so (409, 410) rather than "unknown" (404).
//
// Leases live in this process: a report must reach the replica that
// handed out the lease (otherwise it is answered 404 lease_not_found).
type leaseBook struct {
	ttl time.Duration
	now func() time.Time

	mu   sync.Mutex // protects byID and the state of every heldLease
	byID map[string]*heldLease
}

type leaseState uint8

const (
	leaseHeld leaseState = iota
	leaseReported
	leaseExpired
)

type heldLease struct {
	id      string
	lease   keypool.Lease
	keyID   string
	service string
	holder  string // token id, or "admin"
	expires time.Time
	state   leaseState // protected by leaseBook.mu
}

func newLeaseBook(ttl time.Duration, now func() time.Time) *leaseBook {
	return &leaseBook{ttl: ttl, now: now, byID: map[string]*heldLease{}}
}

// newLeaseID returns a random, unguessable lease id ("kl_" and 32 hex
// digits: 128 bits).
func newLeaseID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "kl_" + hex.EncodeToString(b[:])
}

// put records a lease and returns its id and expiry.
func (b *leaseBook) put(l keypool.Lease, service, holder string) (string, time.Time) {
	h := &heldLease{id: newLeaseID(), lease: l, keyID: l.KeyID(), service: service, holder: holder, expires: b.now().Add(b.ttl)}
	b.mu.Lock()
	b.byID[h.id] = h
	b.mu.Unlock()
	return h.id, h.expires
}

// take marks the lease id on keyID reported and returns it, when holder
// (a token id, or "admin" for the admin, who may report on any lease) may
// report on it; allowed says whether the caller may use the lease's
// service. Its errors are *httpx.Error values: 404 lease_not_found (no
// such lease on that key), 403 forbidden (another token's lease, or a
// service the caller's team may no longer use), 409 lease_reported,
// 410 lease_expired.
func (b *leaseBook) take(id, keyID, holder string, allowed func(service string) bool) (*heldLease, error) {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.byID[id]
	switch {
	case h == nil || h.keyID != keyID:
		return nil, httpx.Errorf(http.StatusNotFound, codeLeaseNotFound,
			"no lease %s on key %q on this server (a lease is held by the replica that handed it out)", safeID(id), keyID)
	case h.holder != holder && holder != "admin":
		return nil, httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "lease %s was taken by another token", id)
	case !allowed(h.service):
		return nil, httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "this token's team may not use service %q", h.service)
	case h.state == leaseReported:
		return nil, httpx.Errorf(http.StatusConflict, codeLeaseReported, "lease %s was already reported; each lease reports once", id)
	case h.state == leaseExpired || !now.Before(h.expires):
		return nil, httpx.Errorf(http.StatusGone, codeLeaseExpired, "lease %s expired at %s; lease the key again", id, h.expires.UTC().Format(time.RFC3339))
	}
	h.state = leaseReported
	return h, nil
}

// safeID returns id when it looks like a lease id, so that an error never
// echoes whatever a client sent.
func safeID(id string) string {
	if len(id) == 35 && strings.HasPrefix(id, "kl_") && strings.Trim(id[3:], "0123456789abcdef") == "" {
		return id
	}
	return "(malformed)"
}

// expire returns every held lease whose TTL has passed and forgets leases
// that ended more than one TTL ago.
func (b *leaseBook) expire() {
	now := b.now()
	var old []*heldLease
	b.mu.Lock()
	for id, h := range b.byID {
		switch {
		case !now.Before(h.expires.Add(b.ttl)):
			if h.state == leaseHeld {
				old = append(old, h)
			}
			delete(b.byID, id)
		case h.state == leaseHeld && !now.Before(h.expires):
			h.state = leaseExpired
			old = append(old, h)
		}
	}
	b.mu.Unlock()
	for _, h := range old {
		h.lease.Release(keypool.Outcome{Kind: keypool.Canceled, Reason: "lease expired without a report"})
	}
}

// releaseAll returns every held lease (at shutdown).
func (b *leaseBook) releaseAll() {
	b.mu.Lock()
	var held []*heldLease
	for _, h := range b.byID {
		if h.state == leaseHeld {
			h.state = leaseExpired
			held = append(held, h)
		}
	}
	b.mu.Unlock()
	for _, h := range held {
		h.lease.Release(keypool.Outcome{Kind: keypool.Canceled, Reason: "shutdown"})
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

// maxClientCooldown bounds the cooldown a client token's rate_limited
// report imposes on a key. The pool spreads a Retry-After by up to 10% plus
// 50 ms so that keys told the same time do not return together; 54 s plus
// that spread ends within the minute the README promises.
const maxClientCooldown = 54 * time.Second

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
	KeyID     string    `json:"key_id"`
	Service   string    `json:"service"`
	Value     string    `json:"value"`
	LeaseID   string    `json:"lease_id"`
	ExpiresAt time.Time `json:"expires_at"`
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
	if service == "" && feature != "" {
		// keypooler's GET /key?feature=…: the feature names the pool
		// when one service the caller may use serves it.
		svcs := slices.DeleteFunc(s.pool.ServicesWithFeature(feature), func(n string) bool { return !p.AllowsService(n) })
		switch len(svcs) {
		case 1:
			service = svcs[0]
		case 0:
			return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "no service serves feature %q; give the service (GET /key?service=…&feature=…)", feature)
		default:
			return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "several services serve feature %q; give the service (GET /key?service=…&feature=…)", feature)
		}
	}
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
	leaseID, expires := s.leases.put(l, service, holder)
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
	httpx.WriteJSON(w, http.StatusOK, leaseResponse{
		KeyID: l.KeyID(), Service: service, Value: l.Secret().Reveal(), LeaseID: leaseID, ExpiresAt: expires.UTC(),
	})
	return nil
}

type reportRequest struct {
	LeaseID    string   `json:"lease_id"`
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
	if err != nil || kind > keypool.Failure && kind != keypool.Refused {
		return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
			"field \"outcome\" must be one of ok, rate_limited, invalid, exhausted, refused, error")
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
	o := keypool.Outcome{Kind: kind, RetryAfter: retry, Reason: "reported: " + kind.String()}
	var service string
	switch {
	case req.LeaseID != "":
		h, err := s.leases.take(req.LeaseID, keyID, holder, p.AllowsService)
		if err != nil {
			return err
		}
		service = h.service
		if holder != "admin" && (kind == keypool.Invalid || kind == keypool.Exhausted) {
			// A client's word, not the upstream's: a report that takes
			// the key out for long (invalid; exhausted, up to 24 h even
			// with a reset) is an ambiguous refusal, confirmed by
			// Service.ConfirmRefusals
			// reports from distinct leases and never below the
			// service's MinActiveKeys floor, so that one token cannot
			// take a shared pool out of rotation.
			o = keypool.Outcome{Kind: keypool.Refused, Reason: o.Reason}
		}
		if holder != "admin" && kind == keypool.RateLimited && (o.RetryAfter == 0 || o.RetryAfter > maxClientCooldown) {
			// A client's 429 cools the key for at most a minute: one token
			// cannot keep a shared pool cooling for the Retry-After cap.
			// Longer waits are the upstream's to say (through the proxy),
			// or the admin's.
			o.RetryAfter = maxClientCooldown
		}
		h.lease.Release(o)
	case p.Admin:
		// The admin may report on any key, leased or not: apply what
		// the state machine would.
		if service = s.findKey(keyID); service == "" {
			return httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "no key %q", keyID)
		}
		s.pool.Report(service, keyID, o)
	default:
		return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest,
			"field \"lease_id\" is required: report with the lease_id GET /key returned for this key")
	}
	s.metrics.reports.WithLabelValues(kind.String()).Inc()
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
