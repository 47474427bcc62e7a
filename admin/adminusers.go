package admin

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// loginInput is the body of POST /admin/auth/login.
type loginInput struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// LoginResponse is the answer to a successful POST /admin/auth/login.
type LoginResponse struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	// ExpiresIn is the session's lifetime in seconds.
	ExpiresIn int64     `json:"expires_in"`
	ExpiresAt time.Time `json:"expires_at"`
	Username  string    `json:"username"`
	Role      string    `json:"role"`
}

// Login signs a user in with a username and password, as POST
// /admin/auth/login does (throttling, constant-time check, audit record).
// It returns the session token and its details; errors are *httpx.Error
// values ready to answer with.
func (a *API) Login(r *http.Request, username, password string) (LoginResponse, error) {
	if a.sessions == nil {
		return LoginResponse{}, notFound("sign-in is not enabled")
	}
	addr := a.clientIP(r)
	tok, u, exp, err := a.sessions.Login(r.Context(), username, password, addr)
	var te *auth.ThrottledError
	switch {
	case errors.As(err, &te):
		return LoginResponse{}, &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeRateLimited, Message: te.Error(), RetryAfter: te.RetryAfter}
	case errors.Is(err, auth.ErrBadCredentials):
		// Name the user in the audit log only when it exists: a password
		// typed into the username field must not be recorded.
		target := "(unknown user)"
		if _, lerr := a.audit.GetAdminUserByName(r.Context(), username); lerr == nil {
			target = username
		}
		a.appendAudit(r, store.AuditEntry{Actor: "-", Action: "auth.login_failed", Target: target, Status: http.StatusUnauthorized})
		return LoginResponse{}, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "%s", auth.ErrBadCredentials.Error())
	case err != nil:
		return LoginResponse{}, err
	}
	a.appendAudit(r, store.AuditEntry{Actor: u.Username, Action: "auth.login", Target: u.ID, Status: http.StatusOK})
	return LoginResponse{AccessToken: tok, TokenType: "bearer", ExpiresIn: int64(a.sessions.TTL() / time.Second),
		ExpiresAt: exp.UTC(), Username: u.Username, Role: u.Role}, nil
}

func (a *API) login(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in loginInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	if in.Username == "" || in.Password == "" {
		return badRequest("username and password are required")
	}
	resp, err := a.Login(r, in.Username, in.Password)
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, resp)
	return nil
}

func (a *API) logout(w http.ResponseWriter, r *http.Request) error {
	id, _ := IdentityFrom(r.Context())
	if len(id.SessionHash) == 0 {
		return badRequest("only a session can sign out; the admin token stays valid until it is changed")
	}
	if err := a.audit.DeleteSession(r.Context(), id.SessionHash); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (a *API) me(w http.ResponseWriter, r *http.Request) error {
	id, _ := IdentityFrom(r.Context())
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"username": id.Username, "user_id": id.UserID, "role": id.Role, "actor": id.Actor()})
	return nil
}

// adminUserInput is the body of POST and PATCH /admin/admin-users.
type adminUserInput struct {
	Username opt[string] `json:"username"`
	Password opt[string] `json:"password"`
	Role     opt[string] `json:"role"`
	Disabled opt[bool]   `json:"disabled"`
}

// isUsername reports whether v is 1 to 64 of [A-Za-z0-9._@-].
func isUsername(v string) bool {
	if v == "" || len(v) > 64 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("._@-", c) >= 0) {
			return false
		}
	}
	return true
}

// apply validates in and applies it to u; it reports whether the change
// must end the user's sessions (new password, role or disabled).
func (a *API) applyAdminUser(in *adminUserInput, u *store.AdminUser) (revoke bool, err error) {
	if in.Username.Set {
		if !isUsername(in.Username.V) {
			return false, badRequest("username must be 1 to 64 letters, digits or . _ @ -")
		}
		u.Username = in.Username.V
	}
	if in.Role.Set {
		if in.Role.V != store.RoleAdmin && in.Role.V != store.RoleViewer {
			return false, badRequest("role must be %q or %q", store.RoleAdmin, store.RoleViewer)
		}
		revoke = revoke || in.Role.V != u.Role
		u.Role = in.Role.V
	}
	if in.Disabled.Set {
		revoke = revoke || in.Disabled.V
		u.Disabled = in.Disabled.V
	}
	if in.Password.Set {
		h, err := auth.HashPassword(in.Password.V, a.sessions.Params())
		if errors.Is(err, auth.ErrWeakPassword) {
			return false, badRequest("password must be %d to %d characters long", auth.MinPasswordLen, auth.MaxPasswordLen)
		} else if err != nil {
			return false, err
		}
		u.PasswordHash, revoke = h, true
	}
	return revoke, nil
}

func (a *API) createAdminUser(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in adminUserInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	if !in.Username.has() || !in.Password.has() {
		return badRequest("username and password are required")
	}
	u := store.AdminUser{Role: store.RoleViewer}
	if _, err := a.applyAdminUser(&in, &u); err != nil {
		return err
	}
	if err := a.audit.CreateAdminUser(r.Context(), &u); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("admin user %q already exists", u.Username)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: admin user created", "admin_user_id", u.ID, "username", u.Username, "role", u.Role)
	httpx.WriteJSON(w, http.StatusCreated, u)
	return nil
}

func (a *API) listAdminUsers(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	us, err := a.audit.ListAdminUsers(r.Context())
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"admin_users": us})
	return nil
}

// findAdminUser returns the admin user named by an id or a username.
func (a *API) findAdminUser(r *http.Request, ref string) (store.AdminUser, error) {
	u, err := a.audit.GetAdminUser(r.Context(), ref)
	if errors.Is(err, store.ErrNotFound) {
		u, err = a.audit.GetAdminUserByName(r.Context(), ref)
	}
	return u, orNotFound(err, "no admin user %q", ref)
}

func (a *API) getAdminUser(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	u, err := a.findAdminUser(r, r.PathValue("id"))
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, u)
	return nil
}

func (a *API) patchAdminUser(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in adminUserInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	u, err := a.findAdminUser(r, r.PathValue("id"))
	if err != nil {
		return err
	}
	id, _ := IdentityFrom(r.Context())
	if id.UserID == u.ID && ((in.Disabled.Set && in.Disabled.V) || (in.Role.Set && in.Role.V != store.RoleAdmin)) {
		return badRequest("you cannot disable or demote yourself; ask another admin")
	}
	revoke, err := a.applyAdminUser(&in, &u)
	if err != nil {
		return err
	}
	if err := a.audit.UpdateAdminUser(r.Context(), &u); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("admin user %q already exists", u.Username)
		}
		return orNotFound(err, "no admin user %q", r.PathValue("id"))
	}
	if revoke {
		if err := a.sessions.RevokeUser(r.Context(), u.ID); err != nil {
			return err
		}
	}
	a.log.InfoContext(r.Context(), "admin: admin user updated", "admin_user_id", u.ID, "username", u.Username, "sessions_ended", revoke)
	httpx.WriteJSON(w, http.StatusOK, u)
	return nil
}

func (a *API) deleteAdminUser(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	u, err := a.findAdminUser(r, r.PathValue("id"))
	if err != nil {
		return err
	}
	if id, _ := IdentityFrom(r.Context()); id.UserID == u.ID {
		return badRequest("you cannot delete yourself; ask another admin")
	}
	if err := a.audit.DeleteAdminUser(r.Context(), u.ID); err != nil {
		return orNotFound(err, "no admin user %q", r.PathValue("id"))
	}
	a.log.InfoContext(r.Context(), "admin: admin user deleted", "admin_user_id", u.ID, "username", u.Username)
	w.WriteHeader(http.StatusNoContent)
	return nil
}
