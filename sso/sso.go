// Package sso lets people sign in to keypoold with Google or any OpenID
// Connect provider and get their own client token without an admin:
// GET /auth/login sends the browser to the provider, GET /auth/callback
// checks what comes back, upserts the user by email into a team, creates
// a token named "sso" and shows it once. A signed-in user manages their
// own tokens at /auth/me; people listed as admins may open an admin
// console session the same way.
//
// # Security
//
//   - Authorization code flow with PKCE (S256). The state sent to the
//     provider is MAC'd (HMAC-SHA-256) with the server's state secret and
//     bound to a cookie holding the PKCE verifier and the nonce (also
//     MAC'd); it expires after [StateTTL] and is accepted once.
//   - The ID token's signature, issuer, audience, expiry and nonce are
//     checked (github.com/coreos/go-oidc/v3), and email_verified must be
//     true.
//   - Failures show a page saying what went wrong and create nothing.
//   - No client secret, code, ID token or client token is logged, put in a
//     URL or in the audit log. The new token reaches its one showing in an
//     encrypted cookie, after a redirect that drops the code and state
//     from the address bar.
//
// Everything here is safe for concurrent use.
package sso

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"
	"golang.org/x/sync/singleflight"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/pages"
	"github.com/keypool/keypool/store"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// StateTTL is how long a sign-in may take from /auth/login to
// /auth/callback.
const StateTTL = 10 * time.Minute

// GoogleIssuer is the issuer of Google accounts.
const GoogleIssuer = "https://accounts.google.com"

// Cookie names.
const (
	stateCookie = "keypool_sso_state"
	viewCookie  = "keypool_sso_new"
	// UserCookie holds a signed-in user's self-service session.
	UserCookie = "keypool_user"
)

// Config configures a [Handler].
type Config struct {
	// Issuer is the provider's issuer URL (discovery at
	// Issuer/.well-known/openid-configuration). Required.
	Issuer string
	// ClientID and ClientSecret are the client registered with the
	// provider. Required. The secret is never logged.
	ClientID     string
	ClientSecret string
	// BaseURL is keypoold's public URL; the redirect URI registered with
	// the provider is BaseURL + "/auth/callback". Required.
	BaseURL string
	// StateSecret MACs the state and seals the one-time token view; at
	// least 32 bytes. Replicas must share it. Required.
	StateSecret []byte
	// AllowedDomains and AllowedEmails limit who may sign in (email
	// domain, or the whole address; case-insensitive). Both empty: any
	// verified email.
	AllowedDomains []string
	AllowedEmails  []string
	// Admins are emails that may open an admin console session by SSO.
	// They may sign in whatever the allow-lists say.
	Admins []string
	// AdminGroup, if set, also makes admins of people whose ID token's
	// "groups" claim holds it.
	AdminGroup string
	// DefaultTeam is the name of the team new users join; created
	// (without limits) when missing. If empty, "sso".
	DefaultTeam string
	// DomainTeams maps an email domain to the team its new users join
	// instead of DefaultTeam (created when missing).
	DomainTeams map[string]string
	// TokenTTL is the lifetime of tokens made here. If zero, they do not
	// expire.
	TokenTTL time.Duration
	// UserSessionTTL is how long a self-service session lasts. If zero,
	// 8h.
	UserSessionTTL time.Duration
	// Timeout bounds each call to the provider (discovery, code
	// exchange, keys). If zero, 10s.
	Timeout time.Duration

	// Store keeps teams, users and tokens. Required.
	Store store.Store
	// Sessions opens admin sessions; nil disables admin sign-in by SSO.
	Sessions *auth.Sessions
	// AdminCookie sets the console's session cookie; required with
	// Sessions.
	AdminCookie func(w http.ResponseWriter, r *http.Request, token string, expires time.Time)
	// OnRevoke is called after a user revokes a token (to drop it from
	// the authentication cache).
	OnRevoke func(tokenID string)
	// ClientIP names the client in the audit log. If nil, r.RemoteAddr.
	ClientIP func(r *http.Request) string
	// Secure reports whether cookies set in answer to r are Secure. If
	// nil, when r came over TLS.
	Secure func(r *http.Request) bool
	// HTTPClient reaches the provider. If nil, a client with Timeout.
	HTTPClient *http.Client
	// Logger receives failures (never a secret). If nil, slog.Default().
	Logger *slog.Logger
	// Now returns the current time. If nil, time.Now.
	Now func() time.Time
}

// Handler serves /auth/. Create it with [New].
type Handler struct {
	cfg    Config
	sig    signer
	pages  map[string]*template.Template
	log    *slog.Logger
	now    func() time.Time
	client *http.Client
	mux    http.Handler

	states    usedSet            // used state ids
	shown     usedSet            // tokens already shown
	discovery singleflight.Group // one discovery attempt at a time

	mu       sync.Mutex // protects provider
	provider *oidc.Provider
}

// New checks cfg and returns a Handler. It does not contact the provider:
// call [Handler.Discover] (bounded by Config.Timeout); until it succeeds,
// every /auth/login tries again.
func New(cfg Config) (*Handler, error) {
	switch {
	case cfg.Issuer == "" || cfg.ClientID == "" || cfg.ClientSecret == "":
		return nil, errors.New("sso: the issuer, client id and client secret are required")
	case cfg.BaseURL == "":
		return nil, errors.New("sso: the auth base URL is required (the redirect URI is BASE/auth/callback)")
	case len(cfg.StateSecret) < 32:
		return nil, errors.New("sso: the state secret must be at least 32 bytes")
	case cfg.Store == nil:
		return nil, errors.New("sso: Config.Store is required")
	case cfg.Sessions != nil && cfg.AdminCookie == nil:
		return nil, errors.New("sso: Config.AdminCookie is required with Sessions")
	}
	cfg.BaseURL = strings.TrimRight(cfg.BaseURL, "/")
	if cfg.DefaultTeam == "" {
		cfg.DefaultTeam = "sso"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.UserSessionTTL <= 0 {
		cfg.UserSessionTTL = 8 * time.Hour
	}
	if cfg.Secure == nil {
		cfg.Secure = func(r *http.Request) bool { return r.TLS != nil }
	}
	if cfg.ClientIP == nil {
		cfg.ClientIP = func(r *http.Request) string { return r.RemoteAddr }
	}
	h := &Handler{cfg: cfg, sig: newSigner(cfg.StateSecret), log: cfg.Logger, now: cfg.Now, client: cfg.HTTPClient}
	if h.log == nil {
		h.log = slog.Default()
	}
	if h.now == nil {
		h.now = time.Now
	}
	if h.client == nil {
		h.client = &http.Client{Timeout: cfg.Timeout}
	}
	var err error
	if h.pages, err = parsePages(); err != nil {
		return nil, err
	}
	h.mux = h.routes()
	return h, nil
}

// RedirectURL is the redirect URI to register with the provider.
func (h *Handler) RedirectURL() string { return h.cfg.BaseURL + "/auth/callback" }

// AdminsEnabled reports whether admins may sign in to the console by SSO.
func (h *Handler) AdminsEnabled() bool {
	return h.cfg.Sessions != nil && (len(h.cfg.Admins) > 0 || h.cfg.AdminGroup != "")
}

// Discover fetches the provider's discovery document, within
// Config.Timeout. On success the provider is kept; on failure the next
// /auth/login tries again.
func (h *Handler) Discover(ctx context.Context) error {
	_, err := h.getProvider(ctx)
	return err
}

// getProvider returns the provider, discovering it first if need be.
// Callers that arrive while an attempt is under way wait for that one
// attempt (bounded by Config.Timeout from its start) or their own ctx,
// whichever ends first; no lock is held while the provider is asked.
func (h *Handler) getProvider(ctx context.Context) (*oidc.Provider, error) {
	h.mu.Lock()
	p := h.provider
	h.mu.Unlock()
	if p != nil {
		return p, nil
	}
	ch := h.discovery.DoChan("", func() (any, error) {
		ctx, cancel := context.WithTimeout(oidc.ClientContext(context.Background(), h.client), h.cfg.Timeout)
		defer cancel()
		p, err := oidc.NewProvider(ctx, h.cfg.Issuer)
		if err != nil {
			return nil, fmt.Errorf("sso: discover %s: %w", h.cfg.Issuer, err)
		}
		h.mu.Lock()
		h.provider = p
		h.mu.Unlock()
		return p, nil
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*oidc.Provider), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("sso: discover %s: %w", h.cfg.Issuer, ctx.Err())
	}
}

func (h *Handler) oauth(p *oidc.Provider) *oauth2.Config {
	return &oauth2.Config{ClientID: h.cfg.ClientID, ClientSecret: h.cfg.ClientSecret, Endpoint: p.Endpoint(),
		RedirectURL: h.RedirectURL(), Scopes: []string{oidc.ScopeOpenID, "email", "profile"}}
}

// ServeHTTP serves a request under /auth/.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Cache-Control", "no-store")
	hd.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("Referrer-Policy", "no-referrer")
	h.mux.ServeHTTP(w, r)
}

func (h *Handler) routes() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /auth/static/", http.StripPrefix("/auth/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /auth/login", h.login)
	mux.HandleFunc("GET /auth/callback", h.callback)
	mux.HandleFunc("GET /auth/token", h.view)
	mux.HandleFunc("GET /auth/done", h.done)
	mux.HandleFunc("GET /auth/me", h.me)
	mux.HandleFunc("POST /auth/me/tokens", h.createToken)
	mux.HandleFunc("POST /auth/me/tokens/{id}/revoke", h.revokeToken)
	mux.HandleFunc("POST /auth/logout", h.logout)
	mux.HandleFunc("/auth/", func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, http.StatusNotFound, "Not found", "There is no such page.")
	})
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, http.StatusForbidden, "Refused", "Cross-origin requests are refused.")
	}))
	return cop.Handler(mux)
}

func parsePages() (map[string]*template.Template, error) {
	return pages.Parse(templateFS, template.FuncMap{
		"when": func(t *time.Time) string {
			if t == nil || t.IsZero() {
				return "—"
			}
			return t.UTC().Format("2006-01-02 15:04 UTC")
		},
	}, "sso")
}

func (h *Handler) render(w http.ResponseWriter, status int, page string, data any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	if err := h.pages[page].ExecuteTemplate(w, "layout.html", data); err != nil {
		h.log.Error("sso: render page", "page", page, "err", err)
	}
}

type errorPage struct {
	Title, Message string
}

// fail shows a failure page. Title and message must hold no secret.
func (h *Handler) fail(w http.ResponseWriter, status int, title, msg string) {
	h.render(w, status, "error", errorPage{Title: title, Message: msg})
}

// allowed reports whether email may sign in.
func (h *Handler) allowed(email string, groups []string) bool {
	email = strings.ToLower(email)
	if h.isAdmin(email, groups) {
		return true
	}
	if len(h.cfg.AllowedDomains) == 0 && len(h.cfg.AllowedEmails) == 0 {
		return true
	}
	if slices.ContainsFunc(h.cfg.AllowedEmails, func(e string) bool { return strings.EqualFold(strings.TrimSpace(e), email) }) {
		return true
	}
	_, domain, _ := strings.Cut(email, "@")
	return slices.ContainsFunc(h.cfg.AllowedDomains, func(d string) bool {
		return strings.EqualFold(strings.TrimPrefix(strings.TrimSpace(d), "@"), domain)
	})
}

func (h *Handler) isAdmin(email string, groups []string) bool {
	if h.cfg.AdminGroup != "" && slices.Contains(groups, h.cfg.AdminGroup) {
		return true
	}
	return slices.ContainsFunc(h.cfg.Admins, func(e string) bool { return strings.EqualFold(strings.TrimSpace(e), email) })
}

func (h *Handler) setCookie(w http.ResponseWriter, r *http.Request, name, value, path string, ttl time.Duration) {
	c := &http.Cookie{Name: name, Value: value, Path: path, HttpOnly: true, Secure: h.cfg.Secure(r), SameSite: http.SameSiteLaxMode}
	if ttl > 0 {
		c.MaxAge = int(ttl / time.Second)
		c.Expires = h.now().Add(ttl)
	} else {
		c.MaxAge = -1
	}
	http.SetCookie(w, c)
}

func (h *Handler) audit(r *http.Request, actor, action, target string, status int) {
	as, ok := h.cfg.Store.(store.AdminStore)
	if !ok {
		return
	}
	e := store.AuditEntry{Time: h.now().UTC(), Actor: actor, Action: action, Target: target, Addr: h.cfg.ClientIP(r), Status: status}
	if err := as.AppendAudit(r.Context(), &e); err != nil {
		h.log.Warn("sso: audit", "action", action, "err", err)
	}
}
