package auth

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool/store"
)

// SessionPrefix starts every session token ("access_token"), so that it
// is told apart from a client token without a store lookup.
const SessionPrefix = "kps_"

// Sign-in errors.
var (
	// ErrBadCredentials is the one answer to a wrong password, an unknown
	// username and a disabled user alike.
	ErrBadCredentials = errors.New("invalid username or password")
)

// ThrottledError is returned by [Sessions.Login] when the [LoginLimiter]
// refuses the attempt.
type ThrottledError struct {
	// RetryAfter is how long until the attempt may be made again.
	RetryAfter time.Duration
}

func (e *ThrottledError) Error() string {
	return "too many failed sign-in attempts; retry later"
}

// Identity is who makes an admin request: the holder of the static admin
// token, or a signed-in admin user.
type Identity struct {
	// UserID and Username name the admin user; both are empty for the
	// static admin token.
	UserID   string
	Username string
	// Role is store.RoleAdmin or store.RoleViewer (always RoleAdmin for
	// the static admin token).
	Role string
	// SessionHash is the hash of the session token, when signed in.
	SessionHash []byte
}

// Actor names the identity in the audit log: the username, or
// "admin-token".
func (id Identity) Actor() string {
	if id.Username == "" {
		return "admin-token"
	}
	return id.Username
}

// IsAdmin reports whether the identity may change things.
func (id Identity) IsAdmin() bool { return id.Role == store.RoleAdmin }

// SessionConfig configures [Sessions].
type SessionConfig struct {
	// Store keeps users and sessions. Required.
	Store store.AdminStore
	// TTL is how long a session lasts from sign-in. If zero, 12h.
	TTL time.Duration
	// Params are the argon2id parameters of new password hashes.
	Params PasswordParams
	// Limiter throttles failed sign-ins. If nil, a default one.
	Limiter *LoginLimiter
	// Now returns the current time. If nil, time.Now.
	Now func() time.Time
}

// Sessions signs admin users in and out and checks session tokens.
// Sessions live in the store (only their SHA-256), so every replica
// sharing the database accepts them and a sign-out, a password change or
// a disabled user takes effect everywhere at once. It is safe for
// concurrent use.
type Sessions struct {
	st      store.AdminStore
	ttl     time.Duration
	params  PasswordParams
	limiter *LoginLimiter
	now     func() time.Time

	dummyOnce sync.Once
	dummy     string // a hash to check unknown users against, for constant time
}

// NewSessions returns a Sessions. It fails without a store.
func NewSessions(cfg SessionConfig) (*Sessions, error) {
	if cfg.Store == nil {
		return nil, errors.New("auth: SessionConfig.Store is required")
	}
	s := &Sessions{st: cfg.Store, ttl: cfg.TTL, params: cfg.Params.withDefaults(), limiter: cfg.Limiter, now: cfg.Now}
	if s.ttl <= 0 {
		s.ttl = 12 * time.Hour
	}
	if s.limiter == nil {
		s.limiter = NewLoginLimiter(LoginLimiterConfig{})
	}
	if s.now == nil {
		s.now = time.Now
	}
	return s, nil
}

// TTL returns how long a session lasts.
func (s *Sessions) TTL() time.Duration { return s.ttl }

// Params returns the argon2id parameters for new password hashes.
func (s *Sessions) Params() PasswordParams { return s.params }

// Store returns the store of users and sessions.
func (s *Sessions) Store() store.AdminStore { return s.st }

// Login checks a username and password and opens a session. It returns
// the session token (shown to the caller once, stored only as a hash), the
// user and when the session expires. Every failure to match (unknown
// username, wrong password, disabled user) is [ErrBadCredentials] after the
// same amount of work; a throttled attempt is a *[ThrottledError]; any
// other error is the store's.
func (s *Sessions) Login(ctx context.Context, username, password, addr string) (token string, u store.AdminUser, expires time.Time, err error) {
	now := s.now()
	if d, ok := s.limiter.Check(username, addr, now); !ok {
		return "", store.AdminUser{}, time.Time{}, &ThrottledError{RetryAfter: d}
	}
	u, err = s.st.GetAdminUserByName(ctx, username)
	switch {
	case errors.Is(err, store.ErrNotFound):
		s.dummyOnce.Do(func() { s.dummy, _ = hashPassword("not a password at all", s.params) })
		CheckPassword(s.dummy, password)
		s.limiter.Fail(username, addr, now)
		return "", store.AdminUser{}, time.Time{}, ErrBadCredentials
	case err != nil:
		return "", store.AdminUser{}, time.Time{}, err
	}
	if ok := CheckPassword(u.PasswordHash, password); !ok || u.Disabled {
		s.limiter.Fail(username, addr, now)
		return "", store.AdminUser{}, time.Time{}, ErrBadCredentials
	}
	s.limiter.Succeed(username, addr)
	tok, _, _, err := NewToken()
	if err != nil {
		return "", store.AdminUser{}, time.Time{}, err
	}
	token = SessionPrefix + strings.TrimPrefix(tok, TokenPrefix)
	expires = now.Add(s.ttl)
	if err := s.st.CreateSession(ctx, &store.Session{Hash: Hash(token), UserID: u.ID, Addr: addr, CreatedAt: now, ExpiresAt: expires}); err != nil {
		return "", store.AdminUser{}, time.Time{}, err
	}
	last := now.UTC()
	u.LastLoginAt = &last
	if err := s.st.UpdateAdminUser(ctx, &u); err != nil && !errors.Is(err, store.ErrNotFound) {
		return "", store.AdminUser{}, time.Time{}, err
	}
	return token, u, expires, nil
}

// IsSessionToken reports whether token has the shape of a session token.
func IsSessionToken(token string) bool {
	return wellFormed(TokenPrefix+strings.TrimPrefix(token, SessionPrefix)) && strings.HasPrefix(token, SessionPrefix)
}

// Lookup returns the identity of a session token. Its errors wrap
// [ErrInvalidToken] (unknown or malformed), [ErrExpired] or [ErrInactive]
// (the user is disabled or gone); any other error is the store's.
func (s *Sessions) Lookup(ctx context.Context, token string) (Identity, error) {
	if !IsSessionToken(token) {
		return Identity{}, ErrInvalidToken
	}
	h := Hash(token)
	se, err := s.st.GetSession(ctx, h)
	if errors.Is(err, store.ErrNotFound) {
		return Identity{}, ErrInvalidToken
	} else if err != nil {
		return Identity{}, fmt.Errorf("auth: look up session: %w", err)
	}
	if !s.now().Before(se.ExpiresAt) {
		_ = s.st.DeleteSession(ctx, h)
		return Identity{}, ErrExpired
	}
	u, err := s.st.GetAdminUser(ctx, se.UserID)
	if errors.Is(err, store.ErrNotFound) {
		return Identity{}, ErrInactive
	} else if err != nil {
		return Identity{}, fmt.Errorf("auth: look up session user: %w", err)
	}
	if u.Disabled {
		return Identity{}, ErrInactive
	}
	return Identity{UserID: u.ID, Username: u.Username, Role: u.Role, SessionHash: h}, nil
}

// Logout ends the session of token; an unknown session is not an error.
func (s *Sessions) Logout(ctx context.Context, token string) error {
	err := s.st.DeleteSession(ctx, Hash(token))
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	return err
}

// RevokeUser ends every session of a user (after a password change, a
// role change, or when it is disabled).
func (s *Sessions) RevokeUser(ctx context.Context, userID string) error {
	_, err := s.st.DeleteUserSessions(ctx, userID)
	return err
}

// OpenSSO opens a session for the admin user named email, whose identity
// a single sign-on provider has vouched for (the caller checks that email
// is an administrator's). The user is created with the admin role and an
// unusable random password when missing; a disabled user is refused with
// [ErrInactive].
func (s *Sessions) OpenSSO(ctx context.Context, email, addr string) (token string, expires time.Time, err error) {
	now := s.now()
	u, err := s.st.GetAdminUserByName(ctx, email)
	if errors.Is(err, store.ErrNotFound) {
		pw, _, _, terr := NewToken()
		if terr != nil {
			return "", time.Time{}, terr
		}
		hash, herr := HashPassword(pw, s.params)
		if herr != nil {
			return "", time.Time{}, herr
		}
		u = store.AdminUser{Username: email, PasswordHash: hash, Role: store.RoleAdmin}
		if err = s.st.CreateAdminUser(ctx, &u); errors.Is(err, store.ErrConflict) {
			u, err = s.st.GetAdminUserByName(ctx, email)
		}
	}
	if err != nil {
		return "", time.Time{}, err
	}
	if u.Disabled {
		return "", time.Time{}, ErrInactive
	}
	tok, _, _, err := NewToken()
	if err != nil {
		return "", time.Time{}, err
	}
	token = SessionPrefix + strings.TrimPrefix(tok, TokenPrefix)
	expires = now.Add(s.ttl)
	if err := s.st.CreateSession(ctx, &store.Session{Hash: Hash(token), UserID: u.ID, Addr: addr, CreatedAt: now, ExpiresAt: expires}); err != nil {
		return "", time.Time{}, err
	}
	last := now.UTC()
	u.LastLoginAt = &last
	if err := s.st.UpdateAdminUser(ctx, &u); err != nil && !errors.Is(err, store.ErrNotFound) {
		return "", time.Time{}, err
	}
	return token, expires, nil
}
