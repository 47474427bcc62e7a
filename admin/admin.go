// Package admin is keypoold's admin REST API: an [http.Handler] for
// /admin/* that manages services, upstream keys (one at a time or in bulk),
// teams, users and client tokens, and reports usage and live key health.
//
// # Authentication
//
// Every request must carry "Authorization: Bearer <admin token>". Anything
// else (no header, another scheme, a wrong token, a client team token) is
// answered 401 invalid_token: the handler compares against the admin token
// only and never looks a client token up, so the admin plane neither
// accepts client tokens nor tells an attacker whether a guessed client
// token is valid. With [Config.Failures] set, an address that keeps
// failing is answered 429 rate_limited with Retry-After.
//
// # Admin users, sessions and roles
//
// With [Config.Sessions] set, admin users sign in with POST
// /admin/auth/login {"username","password"} and get
// {"access_token","token_type":"bearer","expires_in"}; the access token
// works like the admin token until it expires, the user signs out (POST
// /admin/auth/logout), its password or role changes, or it is disabled.
// Role admin may do everything; role viewer may only read (GET), and not
// the admin users nor the audit log: no write, so no new token and no key
// value. Raw key leasing (GET /key) takes the static admin token only.
// Every write (and every sign-in) is recorded in the audit log: actor,
// action ("service.create"), target id, time, address and status, never a
// secret.
//
// # Requests and responses
//
// Bodies are JSON objects with snake_case fields, decoded strictly: unknown
// fields, malformed JSON, wrong types, trailing data and a Content-Type
// other than application/json are 400 bad_request; bodies over 1 MiB (16
// MiB for POST /admin/keys/import) are 413 request_too_large. Validation
// errors are 400 bad_request naming the field. A reference to a record that
// does not exist in a body (a key's service, a user's team_id) is 400; an
// id or name in the path that does not exist is 404 not_found. A taken
// unique name or a key value already in its service is 409 conflict.
// Creation answers 201 with the record, PATCH 200 with the record, DELETE
// 204 with no body. Every error has the shape
// {"error":{"message":…,"type":…,"code":…}}.
//
// PATCH takes a partial object: only the fields present change; null
// means "unchanged" except for expires_at, where null clears it. Send an
// empty list or object to clear a list or map.
//
// # Secrets
//
// Upstream key values (key_value) are write-only: no response, error or
// log line carries them; listings show a masked hint ("sk-a…f9c2"). A
// client token's plaintext appears exactly once, in the response to POST
// /admin/tokens.
//
// # Endpoints
//
//	POST   /admin/services              GET /admin/services
//	GET    /admin/services/{name}       PATCH, DELETE (deletes its keys)
//	POST   /admin/keys                  GET /admin/keys[?service=]
//	POST   /admin/keys/import[?service=] JSON array or text/plain, one key a line
//	GET    /admin/keys/{id}             PATCH, DELETE
//	POST   /admin/teams                 GET /admin/teams
//	GET    /admin/teams/{id}            PATCH, DELETE (deletes its users and tokens)
//	POST   /admin/users                 GET /admin/users[?team_id=]
//	GET    /admin/users/{id}            PATCH, DELETE (deletes its tokens)
//	POST   /admin/tokens                GET /admin/tokens[?team_id=]
//	GET    /admin/tokens/{id}           PATCH, DELETE
//	GET    /admin/usage                 ?team=&token=&service=&key=&model=&since=&until=&group_by=&format=csv
//	GET    /admin/health
//	POST   /admin/auth/login            POST /admin/auth/logout, GET /admin/auth/me
//	POST   /admin/admin-users           GET /admin/admin-users (admins only)
//	GET    /admin/admin-users/{id|username} PATCH, DELETE (admins only)
//	GET    /admin/audit                 ?actor=&action=&target=&since=&until=&limit= (admins only)
//
// Mount the API at "/admin/" without stripping the prefix:
//
//	mux.Handle("/admin/", api)
//
// An API is safe for concurrent use.
package admin

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// Body limits.
const (
	// MaxBody is the limit on a JSON request body.
	MaxBody = 1 << 20
	// MaxImportBody is the limit on a POST /admin/keys/import body.
	MaxImportBody = 16 << 20
	// MaxImportKeys is the most keys one import may hold.
	MaxImportKeys = 100000
)

// Config configures an [API].
type Config struct {
	// Store holds every record. Required.
	Store store.Store
	// Pool supplies live key state for listings and /admin/health, and
	// takes state changes (re-enabling, disabling) at once. If nil,
	// listings show the stored status only.
	Pool *keypool.Pool
	// Auth checks the admin token and drops revoked tokens from its
	// cache. Required.
	Auth *auth.Authenticator
	// Failures, if set, refuses addresses that keep presenting a wrong
	// admin token (429 rate_limited).
	Failures *auth.FailureLimiter
	// ClientIP returns the address Failures counts by. If nil, the host
	// of r.RemoteAddr.
	ClientIP func(r *http.Request) string
	// OnChange is called, synchronously and before the response is
	// written, after every write to services or keys, so that the server
	// can reload its pool at once. It may be nil.
	OnChange func()
	// Logger receives one line per write (ids and names only, never a
	// secret) and internal errors. If nil, slog.Default().
	Logger *slog.Logger
	// AllowMetadataUpstreams lets a service's base_url point at a
	// link-local or cloud metadata address (169.254.0.0/16, fe80::/10,
	// metadata.google.internal, 100.100.100.200, …). Off by default: an
	// admin token must not become a way to read cloud credentials.
	// Loopback and private addresses are always allowed. The check is on
	// the URL as written: a DNS name that resolves to such an address
	// passes, so the proxy's dialer should refuse link-local addresses
	// at connect time as well.
	AllowMetadataUpstreams bool
	// Registry holds the selector, auth_scheme and classifier names a
	// service may name besides the built-in ones (the server passes the
	// ones registered in its Config). Nil: the built-in names only.
	Registry *store.Registry
	// Sessions, if set, signs admin users in (POST /admin/auth/login),
	// accepts their session tokens like the admin token, and serves
	// /admin/admin-users and /admin/audit; every write is then recorded
	// in the audit log of Sessions.Store().
	Sessions *auth.Sessions
	// Now returns the current time. If nil, time.Now.
	Now func() time.Time
}

// API is the admin handler. Create it with [New].
type API struct {
	st       store.Store
	pool     *keypool.Pool
	auth     *auth.Authenticator
	failures *auth.FailureLimiter
	clientIP func(*http.Request) string
	onChange func()
	log      *slog.Logger
	valid    store.Validator  // the rules of every service and key written
	sessions *auth.Sessions   // nil: only the admin token
	audit    store.AdminStore // nil: no audit log
	now      func() time.Time
	mux      *http.ServeMux
}

// New returns an API. It fails when Store or Auth is missing.
func New(cfg Config) (*API, error) {
	if cfg.Store == nil {
		return nil, errors.New("admin: Config.Store is required")
	}
	if cfg.Auth == nil {
		return nil, errors.New("admin: Config.Auth is required")
	}
	a := &API{
		st: cfg.Store, pool: cfg.Pool, auth: cfg.Auth, failures: cfg.Failures,
		clientIP: cfg.ClientIP, onChange: cfg.OnChange, log: cfg.Logger,
		valid: store.Validator{Registry: cfg.Registry, AllowMetadataUpstreams: cfg.AllowMetadataUpstreams}, now: cfg.Now, sessions: cfg.Sessions,
	}
	if a.sessions != nil {
		a.audit = a.sessions.Store()
	}
	if a.log == nil {
		a.log = slog.Default()
	}
	if a.now == nil {
		a.now = time.Now
	}
	if a.clientIP == nil {
		a.clientIP = remoteHost
	}
	a.routes()
	return a, nil
}

func remoteHost(r *http.Request) string {
	if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return h
	}
	return r.RemoteAddr
}

// handlerFunc is a handler that returns its error for [API.fail].
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

func (a *API) routes() {
	a.mux = http.NewServeMux()
	a.route("/admin/services", map[string]handlerFunc{"GET": a.listServices, "POST": a.createService})
	a.route("/admin/services/{name}", map[string]handlerFunc{"GET": a.getService, "PATCH": a.patchService, "DELETE": a.deleteService})
	a.route("/admin/keys", map[string]handlerFunc{"GET": a.listKeys, "POST": a.createKey})
	// No 405 fallback here: "/admin/keys/import" for any method would
	// conflict with "GET /admin/keys/{id}"; other methods reach the
	// {id} routes instead.
	for m, h := range map[string]handlerFunc{"POST": a.importKeys} {
		a.handle(m+" /admin/keys/import", h)
	}
	a.route("/admin/keys/{id}", map[string]handlerFunc{"GET": a.getKey, "PATCH": a.patchKey, "DELETE": a.deleteKey})
	a.route("/admin/tiers", map[string]handlerFunc{"GET": a.listTiers, "POST": a.createTier})
	a.route("/admin/tiers/{name}", map[string]handlerFunc{"GET": a.getTier, "PATCH": a.patchTier, "DELETE": a.deleteTier})
	a.route("/admin/teams", map[string]handlerFunc{"GET": a.listTeams, "POST": a.createTeam})
	a.route("/admin/teams/{id}", map[string]handlerFunc{"GET": a.getTeam, "PATCH": a.patchTeam, "DELETE": a.deleteTeam})
	a.route("/admin/users", map[string]handlerFunc{"GET": a.listUsers, "POST": a.createUser})
	a.route("/admin/users/{id}", map[string]handlerFunc{"GET": a.getUser, "PATCH": a.patchUser, "DELETE": a.deleteUser})
	a.route("/admin/tokens", map[string]handlerFunc{"GET": a.listTokens, "POST": a.createToken})
	a.route("/admin/tokens/{id}", map[string]handlerFunc{"GET": a.getToken, "PATCH": a.patchToken, "DELETE": a.deleteToken})
	a.route("/admin/usage", map[string]handlerFunc{"GET": a.usage})
	a.route("/admin/health", map[string]handlerFunc{"GET": a.health})
	if a.sessions != nil {
		a.route("/admin/auth/login", map[string]handlerFunc{"POST": a.login})
		a.route("/admin/auth/logout", map[string]handlerFunc{"POST": a.logout})
		a.route("/admin/auth/me", map[string]handlerFunc{"GET": a.me})
		a.route("/admin/admin-users", map[string]handlerFunc{"GET": a.listAdminUsers, "POST": a.createAdminUser})
		a.route("/admin/admin-users/{id}", map[string]handlerFunc{"GET": a.getAdminUser, "PATCH": a.patchAdminUser, "DELETE": a.deleteAdminUser})
		a.route("/admin/audit", map[string]handlerFunc{"GET": a.listAudit})
	}
	a.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		httpx.WriteError(w, httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "no admin endpoint %s", r.URL.Path))
	})
}

// route registers one handler per method for path, and a JSON 405 for
// every other method.
func (a *API) route(path string, byMethod map[string]handlerFunc) {
	allow := make([]string, 0, len(byMethod)+1)
	for m, h := range byMethod {
		allow = append(allow, m)
		if m == http.MethodGet {
			allow = append(allow, http.MethodHead)
		}
		a.handle(m+" "+path, h)
	}
	sort.Strings(allow)
	allowed := strings.Join(allow, ", ")
	a.mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allowed)
		httpx.WriteError(w, httpx.Errorf(http.StatusMethodNotAllowed, httpx.CodeMethodNotAllowed,
			"method %s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, allowed))
	})
}

func (a *API) handle(pattern string, h handlerFunc) {
	action := auditAction(pattern)
	a.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if action == "" || a.audit == nil {
			if err := h(w, r); err != nil {
				a.fail(w, r, err)
			}
			return
		}
		rec := &auditWriter{ResponseWriter: w}
		if err := h(rec, r); err != nil {
			a.fail(rec, r, err)
		}
		a.record(r, action, rec)
	})
}

// ServeHTTP authenticates the request (the admin token, a session token,
// or an identity put in its context by [WithIdentity]), checks that the
// identity's role allows it, then serves it.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if a.sessions != nil && r.URL.Path == "/admin/auth/login" {
		// Signing in needs no credential; it is throttled on its own.
		a.mux.ServeHTTP(w, r)
		return
	}
	id, ok := IdentityFrom(r.Context())
	if !ok {
		if id, ok = a.authenticate(w, r); !ok {
			return
		}
		r = r.WithContext(WithIdentity(r.Context(), id))
	}
	if !id.IsAdmin() && !viewerMay(r) {
		httpx.WriteError(w, httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
			"the %s role may read but not change anything, nor manage admin users or read the audit log", id.Role))
		return
	}
	a.mux.ServeHTTP(w, r)
}

// authenticate checks the bearer token of r: the admin token or, with
// Sessions, a session token. It answers the request itself when it
// fails.
func (a *API) authenticate(w http.ResponseWriter, r *http.Request) (auth.Identity, bool) {
	// A valid credential is always served; only bad ones count toward,
	// and are refused by, the per-address slowdown.
	tok := bearer(r)
	if a.auth.IsAdmin(tok) {
		return auth.Identity{Role: store.RoleAdmin}, true
	}
	msg := "the admin API requires Authorization: Bearer <admin token>"
	if a.sessions != nil {
		msg = "the admin API requires Authorization: Bearer <admin token or access token from POST /admin/auth/login>"
	}
	if a.sessions != nil && auth.IsSessionToken(tok) {
		id, err := a.sessions.Lookup(r.Context(), tok)
		switch {
		case err == nil:
			return id, true
		case errors.Is(err, auth.ErrExpired):
			msg = "the session has expired; sign in again"
		case errors.Is(err, auth.ErrInvalidToken), errors.Is(err, auth.ErrInactive):
			msg = "the session is not valid (signed out, password changed or user disabled); sign in again"
		default:
			a.log.ErrorContext(r.Context(), "admin: session lookup failed", "err", err.Error())
			httpx.WriteError(w, httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable, "cannot check the session now; retry"))
			return auth.Identity{}, false
		}
	} else if strings.HasPrefix(tok, auth.TokenPrefix) {
		// Only the shape is looked at, never the store: this says
		// nothing about whether such a team token exists.
		msg = "this is a team token; the admin API needs the admin token"
	}
	if a.failures != nil {
		if wait, slowed := a.failures.Failed(a.clientIP(r), a.now()); slowed {
			httpx.WriteError(w, &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeRateLimited,
				Message: "too many failed authentication attempts; retry later", RetryAfter: wait})
			return auth.Identity{}, false
		}
	}
	// Drain a little of the body so that keep-alive clients see the
	// answer; never read an unbounded amount.
	_, _ = io.CopyN(io.Discard, r.Body, 64<<10)
	w.Header().Set("WWW-Authenticate", `Bearer realm="keypool admin"`)
	httpx.WriteError(w, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "%s", msg))
	return auth.Identity{}, false
}

// viewerMay reports whether a viewer may make request r: reads, except of
// admin users and the audit log, and signing itself out.
func viewerMay(r *http.Request) bool {
	p := r.URL.Path
	if r.Method == http.MethodPost && p == "/admin/auth/logout" {
		return true
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	return !strings.HasPrefix(p, "/admin/admin-users") && !strings.HasPrefix(p, "/admin/audit")
}

// bearer returns the token of an "Authorization: Bearer" header, or "".
func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

// fail maps an error to its response, in one place: *httpx.Error as is;
// the store's sentinels to 404, 409 and 400; anything else to a logged
// 500 whose message says nothing more.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	var he *httpx.Error
	switch {
	case errors.As(err, &he):
	case errors.Is(err, store.ErrNotFound):
		he = httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "not found")
	case errors.Is(err, store.ErrConflict):
		he = httpx.Errorf(http.StatusConflict, httpx.CodeConflict, "conflicts with an existing record")
	case errors.Is(err, store.ErrInvalid):
		he = httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, "invalid record")
	default:
		// Store errors name ids and SQL, never a secret.
		a.log.ErrorContext(r.Context(), "admin: request failed", "method", r.Method, "path", r.URL.Path, "err", err.Error())
		he = httpx.Errorf(http.StatusInternalServerError, httpx.CodeInternal, "internal error")
	}
	httpx.WriteError(w, he)
}

// changed tells the server that services or keys changed.
func (a *API) changed() {
	if a.onChange != nil {
		a.onChange()
	}
}

// badRequest returns a 400 bad_request error.
func badRequest(format string, args ...any) *httpx.Error {
	return httpx.Errorf(http.StatusBadRequest, httpx.CodeBadRequest, format, args...)
}

// invalid turns a *store.ValidationError into a 400 bad_request with its
// message; other errors pass as they are.
func invalid(err error) error {
	var ve *store.ValidationError
	if errors.As(err, &ve) {
		return badRequest("%s", ve.Message)
	}
	return err
}

// notFound returns a 404 not_found error.
func notFound(format string, args ...any) *httpx.Error {
	return httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, format, args...)
}

// conflict returns a 409 conflict error.
func conflict(format string, args ...any) *httpx.Error {
	return httpx.Errorf(http.StatusConflict, httpx.CodeConflict, format, args...)
}

// orNotFound turns the store's ErrNotFound into a 404 naming what.
func orNotFound(err error, format string, args ...any) error {
	if errors.Is(err, store.ErrNotFound) {
		return notFound(format, args...)
	}
	return err
}

// checkQuery rejects query parameters other than allowed, and repeated
// ones.
func checkQuery(r *http.Request, allowed ...string) error {
	for k, vs := range r.URL.Query() {
		ok := false
		for _, a := range allowed {
			if k == a {
				ok = true
				break
			}
		}
		if !ok {
			if len(allowed) == 0 {
				return badRequest("unknown query parameter %q (this endpoint takes none)", k)
			}
			return badRequest("unknown query parameter %q (want %s)", k, strings.Join(allowed, ", "))
		}
		if len(vs) > 1 {
			return badRequest("query parameter %q given more than once", k)
		}
	}
	return nil
}

var _ http.Handler = (*API)(nil)
