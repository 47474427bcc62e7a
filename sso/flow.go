package sso

import (
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/store"
)

// errDisabled refuses a user an admin disabled.
var errDisabled = errors.New("sso: user disabled")

// login starts a sign-in: a new flow in a MAC'd cookie, and a redirect
// to the provider with the MAC'd state, the nonce and the PKCE challenge.
func (h *Handler) login(w http.ResponseWriter, r *http.Request) {
	p, err := h.getProvider(r.Context())
	if err != nil {
		h.log.Warn("sso: provider unreachable", "issuer", h.cfg.Issuer, "err", err)
		h.fail(w, http.StatusServiceUnavailable, "Sign-in provider unreachable",
			"keypool could not reach the sign-in provider. Try again in a minute; if it persists, tell your administrator.")
		return
	}
	admin := r.URL.Query().Get("as") == "admin"
	if admin && !h.AdminsEnabled() {
		h.fail(w, http.StatusNotFound, "Admin sign-in is off", "Single sign-on to the admin console is not configured.")
		return
	}
	exp := h.now().Add(StateTTL)
	f := flow{ID: rand.Text(), Verifier: oauth2.GenerateVerifier(), Nonce: rand.Text(), Admin: admin, Expires: exp.Unix()}
	cookie, err1 := h.sig.sign("flow", f)
	state, err2 := h.sig.sign("state", stateParam{ID: f.ID, Expires: f.Expires})
	if err := errors.Join(err1, err2); err != nil {
		h.fail(w, http.StatusInternalServerError, "Sign-in failed", "keypool could not start the sign-in.")
		return
	}
	h.setCookie(w, r, stateCookie, cookie, "/auth/", StateTTL)
	http.Redirect(w, r, h.oauth(p).AuthCodeURL(state, oidc.Nonce(f.Nonce), oauth2.S256ChallengeOption(f.Verifier)), http.StatusFound)
}

// checkState verifies the state parameter against the flow cookie and
// takes it (single use).
func (h *Handler) checkState(r *http.Request) (flow, error) {
	state := r.URL.Query().Get("state")
	c, err := r.Cookie(stateCookie)
	if state == "" || err != nil || c.Value == "" {
		return flow{}, errStateMissing
	}
	var sp stateParam
	var f flow
	if !h.sig.open("state", state, &sp) || !h.sig.open("flow", c.Value, &f) || sp.ID != f.ID || sp.Expires != f.Expires {
		return flow{}, errStateTampered
	}
	now := h.now()
	exp := time.Unix(f.Expires, 0)
	if !now.Before(exp) {
		return flow{}, errStateExpired
	}
	if !h.states.take(f.ID, exp, now) {
		return flow{}, errStateReplayed
	}
	return f, nil
}

type identity struct {
	Email         string   `json:"email"`
	EmailVerified any      `json:"email_verified"` // a bool, or "true" from some providers
	Groups        []string `json:"groups"`
}

func (i identity) verified() bool {
	switch v := i.EmailVerified.(type) {
	case bool:
		return v
	case string:
		return strings.EqualFold(v, "true")
	}
	return false
}

// callback finishes a sign-in. Every refusal shows a page and creates
// nothing; the code, state and ID token are never logged.
func (h *Handler) callback(w http.ResponseWriter, r *http.Request) {
	h.clearCookie(w, r, stateCookie, "/auth/")
	f, err := h.checkState(r)
	if err != nil {
		h.log.Info("sso: sign-in refused", "reason", err.Error())
		h.fail(w, http.StatusBadRequest, "Sign-in failed", err.Error()+". Start again from the sign-in page.")
		return
	}
	q := r.URL.Query()
	if e := q.Get("error"); e != "" {
		h.log.Info("sso: provider refused the sign-in", "error", safeWord(e))
		h.fail(w, http.StatusForbidden, "Sign-in cancelled", "The sign-in provider did not approve the sign-in.")
		return
	}
	p, err := h.getProvider(r.Context())
	if err != nil {
		h.log.Warn("sso: provider unreachable", "issuer", h.cfg.Issuer, "err", err)
		h.fail(w, http.StatusServiceUnavailable, "Sign-in provider unreachable", "keypool could not reach the sign-in provider. Try again.")
		return
	}
	ctx, cancel := context.WithTimeout(oidc.ClientContext(r.Context(), h.client), h.cfg.Timeout)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, h.client)
	tok, err := h.oauth(p).Exchange(ctx, q.Get("code"), oauth2.VerifierOption(f.Verifier))
	if err != nil {
		reason := "the code was refused"
		status, msg := http.StatusBadRequest, "The sign-in provider refused the sign-in code (it may have been used already). Start again."
		var re *oauth2.RetrieveError
		if !errors.As(err, &re) || re.Response == nil || re.Response.StatusCode >= 500 {
			reason, status, msg = "provider unreachable", http.StatusBadGateway, "keypool could not reach the sign-in provider to finish the sign-in. Try again."
		}
		h.log.Info("sso: code exchange failed", "reason", reason)
		h.fail(w, status, "Sign-in failed", msg)
		return
	}
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		h.log.Info("sso: sign-in refused", "reason", "no id_token in the token response")
		h.fail(w, http.StatusBadGateway, "Sign-in failed", "The sign-in provider sent no ID token.")
		return
	}
	idt, err := p.Verifier(&oidc.Config{ClientID: h.cfg.ClientID, Now: h.now}).Verify(ctx, raw)
	if err != nil {
		h.log.Info("sso: sign-in refused", "reason", "ID token verification failed", "err", safeErr(err))
		h.fail(w, http.StatusForbidden, "Sign-in failed", "The sign-in provider's answer could not be verified (issuer, audience, signature or expiry).")
		return
	}
	if idt.Nonce != f.Nonce {
		h.log.Info("sso: sign-in refused", "reason", "nonce mismatch")
		h.fail(w, http.StatusForbidden, "Sign-in failed", "The sign-in provider's answer does not belong to this sign-in (nonce mismatch).")
		return
	}
	var id identity
	if err := idt.Claims(&id); err != nil || id.Email == "" {
		h.fail(w, http.StatusForbidden, "Sign-in failed", "The sign-in provider did not say which email you have.")
		return
	}
	email := strings.ToLower(strings.TrimSpace(id.Email))
	if !id.verified() {
		h.log.Info("sso: sign-in refused", "reason", "email not verified")
		h.fail(w, http.StatusForbidden, "Email not verified", "Your email address is not verified with the sign-in provider; verify it there, then sign in again.")
		return
	}
	if !h.allowed(email, id.Groups) {
		h.log.Info("sso: sign-in refused", "reason", "email not allowed")
		h.audit(r, email, "sso.refused", "", http.StatusForbidden)
		h.fail(w, http.StatusForbidden, "Not allowed", "The address "+email+" may not sign in to this keypool. Ask your administrator to allow your domain or address.")
		return
	}
	if f.Admin {
		h.adminSignIn(w, r, email, id.Groups)
		return
	}
	u, err := h.upsertUser(r.Context(), email)
	if errors.Is(err, errDisabled) {
		h.fail(w, http.StatusForbidden, "Account disabled", "An administrator disabled your account; it cannot get tokens.")
		return
	} else if err != nil {
		h.log.Error("sso: upsert user", "err", err)
		h.fail(w, http.StatusInternalServerError, "Sign-in failed", "keypool could not record your account. Try again.")
		return
	}
	h.startUserSession(w, r, u)
	if !h.mintAndShow(w, r, u, email) {
		return
	}
}

// adminSignIn opens an admin console session for an admin email.
func (h *Handler) adminSignIn(w http.ResponseWriter, r *http.Request, email string, groups []string) {
	if !h.isAdmin(email, groups) {
		h.audit(r, email, "sso.admin_refused", "", http.StatusForbidden)
		h.fail(w, http.StatusForbidden, "Not an administrator", email+" is not an administrator of this keypool. Sign in at /auth/login for your own tokens.")
		return
	}
	token, expires, err := h.cfg.Sessions.OpenSSO(r.Context(), email, h.cfg.ClientIP(r))
	if errors.Is(err, auth.ErrInactive) {
		h.fail(w, http.StatusForbidden, "Account disabled", "This admin user is disabled.")
		return
	} else if err != nil {
		h.log.Error("sso: open admin session", "err", err)
		h.fail(w, http.StatusInternalServerError, "Sign-in failed", "keypool could not open your session. Try again.")
		return
	}
	h.cfg.AdminCookie(w, r, token, expires)
	h.audit(r, email, "sso.admin_login", "", http.StatusOK)
	http.Redirect(w, r, "/auth/done", http.StatusSeeOther)
}

// done sends a freshly signed-in admin on to the console from a page of
// this site, so that the SameSite=Strict session cookie is sent.
func (h *Handler) done(w http.ResponseWriter, r *http.Request) {
	h.render(w, http.StatusOK, "done", nil)
}

// upsertUser returns the user with this email as external id, creating
// it in the default team (created when missing).
func (h *Handler) upsertUser(ctx context.Context, email string) (store.User, error) {
	users, err := h.cfg.Store.ListUsers(ctx, "")
	if err != nil {
		return store.User{}, err
	}
	for _, u := range users {
		if strings.EqualFold(u.ExternalID, email) {
			if u.Disabled {
				return store.User{}, errDisabled
			}
			return u, nil
		}
	}
	name := h.cfg.DefaultTeam
	_, domain, _ := strings.Cut(email, "@")
	for d, t := range h.cfg.DomainTeams {
		if strings.EqualFold(strings.TrimPrefix(d, "@"), domain) && t != "" {
			name = t
		}
	}
	team, err := h.team(ctx, name)
	if err != nil {
		return store.User{}, err
	}
	u := store.User{ExternalID: email, TeamID: team.ID}
	if err := h.cfg.Store.CreateUser(ctx, &u); errors.Is(err, store.ErrConflict) {
		return h.upsertUser(ctx, email) // another sign-in created it
	} else if err != nil {
		return store.User{}, err
	}
	return u, nil
}

// team returns the team with this name, creating it when missing.
func (h *Handler) team(ctx context.Context, name string) (store.Team, error) {
	teams, err := h.cfg.Store.ListTeams(ctx)
	if err != nil {
		return store.Team{}, err
	}
	for _, t := range teams {
		if t.Name == name {
			return t, nil
		}
	}
	t := store.Team{Name: name}
	if err := h.cfg.Store.CreateTeam(ctx, &t); errors.Is(err, store.ErrConflict) {
		return h.team(ctx, name)
	} else if err != nil {
		return store.Team{}, err
	}
	return t, nil
}

// newToken is the one-time view of a new token, sealed in a cookie.
type newToken struct {
	TokenID string `json:"t"`
	Token   string `json:"k"`
	UserID  string `json:"u"`
	Expires int64  `json:"e"`
}

// viewTTL bounds how long a new token waits for its one showing.
const viewTTL = 2 * time.Minute

// mintAndShow creates an "sso" token for u and redirects to its one
// showing. It reports whether it did.
func (h *Handler) mintAndShow(w http.ResponseWriter, r *http.Request, u store.User, actor string) bool {
	plain, prefix, hash, err := auth.NewToken()
	if err != nil {
		h.fail(w, http.StatusInternalServerError, "Token not created", "keypool could not create a token. Try again.")
		return false
	}
	t := store.Token{Name: "sso", TeamID: u.TeamID, UserID: u.ID, Prefix: prefix, Hash: hash, IsActive: true}
	if h.cfg.TokenTTL > 0 {
		exp := h.now().Add(h.cfg.TokenTTL).UTC()
		t.ExpiresAt = &exp
	}
	if err := h.cfg.Store.CreateToken(r.Context(), &t); err != nil {
		h.log.Error("sso: create token", "err", err)
		h.fail(w, http.StatusInternalServerError, "Token not created", "keypool could not create a token. Try again.")
		return false
	}
	h.audit(r, actor, "sso.token_create", t.ID, http.StatusCreated)
	sealed, err := h.sig.seal(newToken{TokenID: t.ID, Token: plain, UserID: u.ID, Expires: h.now().Add(viewTTL).Unix()})
	if err != nil {
		h.fail(w, http.StatusInternalServerError, "Token not shown", "keypool could not show the token.")
		return false
	}
	h.setCookie(w, r, viewCookie, sealed, "/auth/token", viewTTL)
	http.Redirect(w, r, "/auth/token", http.StatusSeeOther)
	return true
}

type tokenPage struct {
	Email, Token, Prefix, BaseURL string
	ExpiresAt                     *time.Time
}

// view shows a new token, once: the sealed cookie is cleared and the
// token id remembered as shown.
func (h *Handler) view(w http.ResponseWriter, r *http.Request) {
	h.clearCookie(w, r, viewCookie, "/auth/token")
	c, err := r.Cookie(viewCookie)
	var nt newToken
	if err != nil || !h.sig.unseal(c.Value, &nt) || !h.now().Before(time.Unix(nt.Expires, 0)) {
		h.fail(w, http.StatusNotFound, "Nothing to show", "A new token is shown only once, right after it is created. Your tokens are listed on your page, /auth/me.")
		return
	}
	u, ok := h.sessionUser(r)
	if !ok || u.ID != nt.UserID || !h.shown.take(nt.TokenID, time.Unix(nt.Expires, 0), h.now()) {
		h.fail(w, http.StatusNotFound, "Nothing to show", "A new token is shown only once, right after it is created. Your tokens are listed on your page, /auth/me.")
		return
	}
	t, err := h.cfg.Store.GetToken(r.Context(), nt.TokenID)
	if err != nil {
		h.fail(w, http.StatusNotFound, "Nothing to show", "That token no longer exists.")
		return
	}
	h.render(w, http.StatusOK, "token", tokenPage{Email: u.ExternalID, Token: nt.Token, Prefix: t.Prefix, BaseURL: h.cfg.BaseURL, ExpiresAt: t.ExpiresAt})
}

func (h *Handler) clearCookie(w http.ResponseWriter, r *http.Request, name, path string) {
	if _, err := r.Cookie(name); err == nil {
		h.setCookie(w, r, name, "", path, -1)
	}
}

// safeWord keeps an error code from the provider short and plain.
func safeWord(s string) string {
	if len(s) > 64 {
		s = s[:64]
	}
	return strings.Map(func(r rune) rune {
		if r == '_' || r == '-' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') {
			return r
		}
		return -1
	}, s)
}

// safeErr describes a verification error without the token: go-oidc's
// errors name claims, not the token itself, but are cut short anyway.
func safeErr(err error) string {
	s := err.Error()
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}
