package sqlstore

import (
	"context"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/keypool/keypool/store"
)

type adminUserRow struct {
	ID           string     `gorm:"column:id;primaryKey"`
	Username     string     `gorm:"column:username"`
	PasswordHash string     `gorm:"column:password_hash"`
	Role         string     `gorm:"column:role"`
	Disabled     bool       `gorm:"column:disabled"`
	LastLoginAt  *time.Time `gorm:"column:last_login_at"`
	CreatedAt    time.Time  `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt    time.Time  `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (adminUserRow) TableName() string { return "admin_users" }

func (r *adminUserRow) user() store.AdminUser {
	return store.AdminUser{ID: r.ID, Username: r.Username, PasswordHash: r.PasswordHash, Role: r.Role,
		Disabled: r.Disabled, LastLoginAt: utcPtr(r.LastLoginAt), CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC()}
}

type sessionRow struct {
	Hash      []byte    `gorm:"column:hash;primaryKey"`
	UserID    string    `gorm:"column:user_id"`
	Addr      string    `gorm:"column:addr"`
	CreatedAt time.Time `gorm:"column:created_at;autoCreateTime:false"`
	ExpiresAt time.Time `gorm:"column:expires_at"`
}

func (sessionRow) TableName() string { return "admin_sessions" }

type auditRow struct {
	ID     int64     `gorm:"column:id;primaryKey;autoIncrement"`
	Time   time.Time `gorm:"column:ts"`
	Actor  string    `gorm:"column:actor"`
	Action string    `gorm:"column:action"`
	Target string    `gorm:"column:target"`
	Addr   string    `gorm:"column:addr"`
	Status int       `gorm:"column:status"`
}

func (auditRow) TableName() string { return "audit_log" }

func checkAdminUser(u *store.AdminUser) error {
	if u.Username == "" || u.PasswordHash == "" {
		return fmt.Errorf("%w: username and password_hash are required", store.ErrInvalid)
	}
	if u.Role != store.RoleAdmin && u.Role != store.RoleViewer {
		return fmt.Errorf("%w: role must be %q or %q", store.ErrInvalid, store.RoleAdmin, store.RoleViewer)
	}
	return nil
}

// CreateAdminUser inserts an admin user with a new "adm_…" id (unless
// u.ID is set); its username must be unique.
func (s *Store) CreateAdminUser(ctx context.Context, u *store.AdminUser) error {
	if err := checkAdminUser(u); err != nil {
		return fmt.Errorf("sqlstore: create admin user: %w", err)
	}
	now := s.now()
	row := adminUserRow{ID: u.ID, Username: u.Username, PasswordHash: u.PasswordHash, Role: u.Role,
		Disabled: u.Disabled, LastLoginAt: u.LastLoginAt, CreatedAt: now, UpdatedAt: now}
	if row.ID == "" {
		row.ID = newID("adm")
	}
	if err := s.write(ctx, "create admin user", false, func(tx *gorm.DB) error { return tx.Create(&row).Error }); err != nil {
		return err
	}
	u.ID, u.CreatedAt, u.UpdatedAt = row.ID, now, now
	return nil
}

// GetAdminUser returns one admin user by id.
func (s *Store) GetAdminUser(ctx context.Context, id string) (store.AdminUser, error) {
	var row adminUserRow
	if err := s.r.WithContext(ctx).Where("id = ?", id).Take(&row).Error; err != nil {
		return store.AdminUser{}, mapErr("get admin user "+id, err)
	}
	return row.user(), nil
}

// GetAdminUserByName returns one admin user by username.
func (s *Store) GetAdminUserByName(ctx context.Context, username string) (store.AdminUser, error) {
	var row adminUserRow
	if err := s.r.WithContext(ctx).Where("username = ?", username).Take(&row).Error; err != nil {
		return store.AdminUser{}, mapErr("get admin user by name", err)
	}
	return row.user(), nil
}

// ListAdminUsers returns every admin user, ordered by username.
func (s *Store) ListAdminUsers(ctx context.Context) ([]store.AdminUser, error) {
	var rows []adminUserRow
	if err := s.r.WithContext(ctx).Order("username").Find(&rows).Error; err != nil {
		return nil, mapErr("list admin users", err)
	}
	out := make([]store.AdminUser, len(rows))
	for i := range rows {
		out[i] = rows[i].user()
	}
	return out, nil
}

// UpdateAdminUser replaces every field of admin user u.ID except
// CreatedAt.
func (s *Store) UpdateAdminUser(ctx context.Context, u *store.AdminUser) error {
	if err := checkAdminUser(u); err != nil {
		return fmt.Errorf("sqlstore: update admin user %s: %w", u.ID, err)
	}
	now := s.now()
	if err := s.write(ctx, "update admin user "+u.ID, false, func(tx *gorm.DB) error {
		return affected(tx.Model(&adminUserRow{}).Where("id = ?", u.ID).Updates(map[string]any{
			"username": u.Username, "password_hash": u.PasswordHash, "role": u.Role, "disabled": u.Disabled,
			"last_login_at": u.LastLoginAt, "updated_at": now,
		}))
	}); err != nil {
		return err
	}
	u.UpdatedAt = now
	return nil
}

// DeleteAdminUser deletes an admin user and its sessions.
func (s *Store) DeleteAdminUser(ctx context.Context, id string) error {
	return s.write(ctx, "delete admin user "+id, false, func(tx *gorm.DB) error {
		if err := tx.Where("user_id = ?", id).Delete(&sessionRow{}).Error; err != nil {
			return err
		}
		return affected(tx.Where("id = ?", id).Delete(&adminUserRow{}))
	})
}

// CreateSession stores a session (by its token hash).
func (s *Store) CreateSession(ctx context.Context, se *store.Session) error {
	if len(se.Hash) == 0 || se.UserID == "" {
		return fmt.Errorf("sqlstore: create session: %w: hash and user_id are required", store.ErrInvalid)
	}
	if se.CreatedAt.IsZero() {
		se.CreatedAt = s.now()
	}
	row := sessionRow{Hash: se.Hash, UserID: se.UserID, Addr: se.Addr, CreatedAt: se.CreatedAt, ExpiresAt: se.ExpiresAt}
	return s.write(ctx, "create session", false, func(tx *gorm.DB) error { return tx.Create(&row).Error })
}

// GetSession returns the session whose token hashes to hash.
func (s *Store) GetSession(ctx context.Context, hash []byte) (store.Session, error) {
	var row sessionRow
	if err := s.r.WithContext(ctx).Where("hash = ?", hash).Take(&row).Error; err != nil {
		return store.Session{}, mapErr("get session", err)
	}
	return store.Session{Hash: row.Hash, UserID: row.UserID, Addr: row.Addr, CreatedAt: row.CreatedAt.UTC(), ExpiresAt: row.ExpiresAt.UTC()}, nil
}

// DeleteSession deletes one session.
func (s *Store) DeleteSession(ctx context.Context, hash []byte) error {
	return s.write(ctx, "delete session", false, func(tx *gorm.DB) error {
		return affected(tx.Where("hash = ?", hash).Delete(&sessionRow{}))
	})
}

// DeleteUserSessions deletes every session of an admin user.
func (s *Store) DeleteUserSessions(ctx context.Context, userID string) (int64, error) {
	var n int64
	err := s.write(ctx, "delete sessions of "+userID, false, func(tx *gorm.DB) error {
		res := tx.Where("user_id = ?", userID).Delete(&sessionRow{})
		n = res.RowsAffected
		return res.Error
	})
	return n, err
}

// PruneSessions deletes sessions that expired before t.
func (s *Store) PruneSessions(ctx context.Context, t time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, "prune sessions", false, func(tx *gorm.DB) error {
		res := tx.Where("expires_at < ?", t).Delete(&sessionRow{})
		n = res.RowsAffected
		return res.Error
	})
	return n, err
}

// AppendAudit appends one audit entry, assigning its id (and its time
// when zero).
func (s *Store) AppendAudit(ctx context.Context, e *store.AuditEntry) error {
	if e.Action == "" {
		return fmt.Errorf("sqlstore: append audit: %w: action is required", store.ErrInvalid)
	}
	if e.Time.IsZero() {
		e.Time = s.now()
	}
	row := auditRow{Time: e.Time, Actor: e.Actor, Action: e.Action, Target: e.Target, Addr: e.Addr, Status: e.Status}
	if err := s.write(ctx, "append audit", false, func(tx *gorm.DB) error { return tx.Create(&row).Error }); err != nil {
		return err
	}
	e.ID = row.ID
	return nil
}

// ListAudit returns audit entries matching q, newest first.
func (s *Store) ListAudit(ctx context.Context, q store.AuditQuery) ([]store.AuditEntry, error) {
	db := s.r.WithContext(ctx).Model(&auditRow{})
	if q.Actor != "" {
		db = db.Where("actor = ?", q.Actor)
	}
	if q.Action != "" {
		db = db.Where("action = ?", q.Action)
	}
	if q.Target != "" {
		db = db.Where("target = ?", q.Target)
	}
	if !q.Since.IsZero() {
		db = db.Where("ts >= ?", q.Since)
	}
	if !q.Until.IsZero() {
		db = db.Where("ts < ?", q.Until)
	}
	limit := q.Limit
	if limit <= 0 {
		limit = 100
	}
	var rows []auditRow
	if err := db.Order("ts DESC, id DESC").Limit(limit).Find(&rows).Error; err != nil {
		return nil, mapErr("list audit", err)
	}
	out := make([]store.AuditEntry, len(rows))
	for i, r := range rows {
		out[i] = store.AuditEntry{ID: r.ID, Time: r.Time.UTC(), Actor: r.Actor, Action: r.Action, Target: r.Target, Addr: r.Addr, Status: r.Status}
	}
	return out, nil
}

// PruneAudit deletes audit entries older than before.
func (s *Store) PruneAudit(ctx context.Context, before time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, "prune audit", false, func(tx *gorm.DB) error {
		res := tx.Where("ts < ?", before).Delete(&auditRow{})
		n = res.RowsAffected
		return res.Error
	})
	return n, err
}

var _ store.AdminStore = (*Store)(nil)

// UsageStatusCounts counts usage records since t per service: all, 429s
// and errors (5xx, or status 0 for no answer).
func (s *Store) UsageStatusCounts(ctx context.Context, since time.Time) (map[string]store.StatusCounts, error) {
	var rows []struct {
		Service     string
		Requests    int64
		RateLimited int64
		Errors      int64
	}
	err := s.r.WithContext(ctx).Raw(`SELECT service, COUNT(*) AS requests,
		SUM(CASE WHEN status = 429 THEN 1 ELSE 0 END) AS rate_limited,
		SUM(CASE WHEN status >= 500 OR status = 0 THEN 1 ELSE 0 END) AS errors
		FROM usage_records WHERE ts >= ? GROUP BY service`, since.UnixMicro()).Scan(&rows).Error
	if err != nil {
		return nil, mapErr("count usage statuses", err)
	}
	out := make(map[string]store.StatusCounts, len(rows))
	for _, r := range rows {
		out[r.Service] = store.StatusCounts{Requests: r.Requests, RateLimited: r.RateLimited, Errors: r.Errors}
	}
	return out, nil
}

var _ store.StatusCounter = (*Store)(nil)
