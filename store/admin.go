package store

import (
	"context"
	"time"
)

// Admin roles: what an [AdminUser] may do.
const (
	// RoleAdmin may do everything the admin API offers.
	RoleAdmin = "admin"
	// RoleViewer may read (services, keys by their hint, teams, usage) but
	// change nothing and see no secret.
	RoleViewer = "viewer"
)

// AdminUser is a person who signs in to the admin API and the console.
// PasswordHash is an encoded argon2id hash; it never leaves the server.
type AdminUser struct {
	ID           string     `json:"id"`
	Username     string     `json:"username"`
	PasswordHash string     `json:"-"`
	Role         string     `json:"role"`
	Disabled     bool       `json:"disabled"`
	LastLoginAt  *time.Time `json:"last_login_at,omitempty"`
	CreatedAt    time.Time  `json:"created_at"`
	UpdatedAt    time.Time  `json:"updated_at"`
}

// Session is a signed-in admin user's session. Only the SHA-256 of its
// token is stored, so that replicas sharing the database share sessions
// and a copy of the database reveals none.
type Session struct {
	Hash      []byte    `json:"-"`
	UserID    string    `json:"user_id"`
	Addr      string    `json:"addr,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
}

// AuditEntry is one admin action: who (Actor, a username or "admin-token"),
// what (Action, e.g. "service.create"), on what (Target, an id or name),
// when and from where. It never holds a secret.
type AuditEntry struct {
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	Target string    `json:"target,omitempty"`
	Addr   string    `json:"addr,omitempty"`
	Status int       `json:"status,omitempty"`
}

// AuditQuery filters the audit log. Empty fields match all; Since is
// inclusive, Until exclusive. Limit caps the rows returned, newest first
// (if zero, 100).
type AuditQuery struct {
	Actor, Action, Target string
	Since, Until          time.Time
	Limit                 int
}

// AdminStore keeps admin users, their sessions and the audit log. A
// [Store] that supports sign-in implements it too (sqlstore does).
type AdminStore interface {
	// CreateAdminUser inserts a user with a new id; Username is unique
	// (else ErrConflict).
	CreateAdminUser(ctx context.Context, u *AdminUser) error
	GetAdminUser(ctx context.Context, id string) (AdminUser, error)
	GetAdminUserByName(ctx context.Context, username string) (AdminUser, error)
	// ListAdminUsers returns every admin user, ordered by username.
	ListAdminUsers(ctx context.Context) ([]AdminUser, error)
	// UpdateAdminUser replaces every field of user u.ID except CreatedAt.
	UpdateAdminUser(ctx context.Context, u *AdminUser) error
	// DeleteAdminUser deletes a user and its sessions.
	DeleteAdminUser(ctx context.Context, id string) error

	CreateSession(ctx context.Context, s *Session) error
	// GetSession returns the session with this token hash.
	GetSession(ctx context.Context, hash []byte) (Session, error)
	DeleteSession(ctx context.Context, hash []byte) error
	// DeleteUserSessions deletes every session of a user and returns how
	// many there were.
	DeleteUserSessions(ctx context.Context, userID string) (int64, error)
	// PruneSessions deletes sessions that expired before t.
	PruneSessions(ctx context.Context, t time.Time) (int64, error)

	AppendAudit(ctx context.Context, e *AuditEntry) error
	// ListAudit returns entries newest first.
	ListAudit(ctx context.Context, q AuditQuery) ([]AuditEntry, error)
	// PruneAudit deletes entries older than before.
	PruneAudit(ctx context.Context, before time.Time) (int64, error)
}

// StatusCounts are a service's requests since some time, by outcome.
type StatusCounts struct {
	Requests    int64 `json:"requests"`
	RateLimited int64 `json:"rate_limited"` // answered 429
	Errors      int64 `json:"errors"`       // answered 5xx, or no answer
}

// StatusCounter counts recent requests per service from usage records;
// sqlstore implements it, for the console's overview.
type StatusCounter interface {
	UsageStatusCounts(ctx context.Context, since time.Time) (map[string]StatusCounts, error)
}
