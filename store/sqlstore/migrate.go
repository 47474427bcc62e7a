package sqlstore

import (
	"context"
	"fmt"
	"strings"

	"gorm.io/gorm"
)

// migration is one schema version. Its statements use placeholders that
// each dialect replaces: {blob}, {ts}, {float}, {autoid}.
type migration struct {
	version int
	name    string
	stmts   []string
}

// migrations are applied in order and never edited once released: add a
// new version instead.
var migrations = []migration{
	{1, "initial schema", []string{
		`CREATE TABLE meta (
			name TEXT PRIMARY KEY,
			counter BIGINT NOT NULL DEFAULT 0,
			value {blob}
		)`,
		`INSERT INTO meta (name, counter) VALUES ('version', 0)`,
		`CREATE TABLE services (
			name TEXT PRIMARY KEY,
			display_name TEXT NOT NULL DEFAULT '',
			base_url TEXT NOT NULL DEFAULT '',
			auth_scheme TEXT NOT NULL DEFAULT '',
			rate_limit_rpm INTEGER NOT NULL DEFAULT 0,
			max_in_flight INTEGER NOT NULL DEFAULT 0,
			proxy_headers TEXT NOT NULL DEFAULT '',
			selector TEXT NOT NULL DEFAULT '',
			external_name TEXT NOT NULL DEFAULT '',
			limits TEXT NOT NULL DEFAULT '',
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`CREATE TABLE keys (
			id TEXT PRIMARY KEY,
			service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
			ciphertext {blob} NOT NULL,
			key_version BIGINT NOT NULL,
			fingerprint {blob} NOT NULL,
			hint TEXT NOT NULL DEFAULT '',
			weight INTEGER NOT NULL DEFAULT 0,
			priority INTEGER NOT NULL DEFAULT 0,
			rate_limit_rpm INTEGER NOT NULL DEFAULT 0,
			max_in_flight INTEGER NOT NULL DEFAULT 0,
			labels TEXT NOT NULL DEFAULT '',
			balance_total {float} NOT NULL DEFAULT 0,
			balance_used {float} NOT NULL DEFAULT 0,
			balance_unit TEXT NOT NULL DEFAULT '',
			account_email TEXT NOT NULL DEFAULT '',
			status TEXT NOT NULL DEFAULT 'active',
			origin TEXT NOT NULL DEFAULT 'local',
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL,
			UNIQUE (service, fingerprint)
		)`,
		`CREATE INDEX keys_service_created ON keys (service, created_at, id)`,
		`CREATE TABLE teams (
			id TEXT PRIMARY KEY,
			name TEXT NOT NULL UNIQUE,
			allowed_services TEXT NOT NULL DEFAULT '',
			limits TEXT NOT NULL DEFAULT '',
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`CREATE TABLE users (
			id TEXT PRIMARY KEY,
			external_id TEXT NOT NULL UNIQUE,
			team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`CREATE INDEX users_team ON users (team_id)`,
		`CREATE TABLE tokens (
			id TEXT PRIMARY KEY,
			name TEXT NOT NULL DEFAULT '',
			team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
			user_id TEXT REFERENCES users(id) ON DELETE CASCADE,
			prefix TEXT NOT NULL DEFAULT '',
			hash {blob} NOT NULL UNIQUE,
			scopes TEXT NOT NULL DEFAULT '',
			expires_at {ts},
			is_active BOOLEAN NOT NULL DEFAULT TRUE,
			limits TEXT NOT NULL DEFAULT '',
			last_used_at {ts},
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`CREATE INDEX tokens_team ON tokens (team_id)`,
		`CREATE INDEX tokens_user ON tokens (user_id)`,
		`CREATE TABLE usage_records (
			id {autoid},
			ts BIGINT NOT NULL,
			request_id TEXT NOT NULL DEFAULT '',
			team_id TEXT NOT NULL DEFAULT '',
			token_id TEXT NOT NULL DEFAULT '',
			service TEXT NOT NULL DEFAULT '',
			key_id TEXT NOT NULL DEFAULT '',
			model TEXT NOT NULL DEFAULT '',
			status INTEGER NOT NULL DEFAULT 0,
			tokens_in BIGINT NOT NULL DEFAULT 0,
			tokens_out BIGINT NOT NULL DEFAULT 0,
			cached_tokens BIGINT NOT NULL DEFAULT 0,
			cost {float} NOT NULL DEFAULT 0,
			latency_ms BIGINT NOT NULL DEFAULT 0
		)`,
		`CREATE INDEX usage_ts ON usage_records (ts)`,
	}},
	{2, "key status reasons, service prices, usage indexes", []string{
		`ALTER TABLE keys ADD COLUMN status_reason TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE services ADD COLUMN prices TEXT NOT NULL DEFAULT ''`,
		`CREATE INDEX usage_team_ts ON usage_records (team_id, ts)`,
		`CREATE INDEX usage_service_ts ON usage_records (service, ts)`,
	}},
	{3, "service llm_family", []string{
		`ALTER TABLE services ADD COLUMN llm_family TEXT NOT NULL DEFAULT ''`,
	}},
	{4, "service key_policy (retry_after_cap, confirm_refusals, min_active_keys, max_ejection_percent as JSON)", []string{
		`ALTER TABLE services ADD COLUMN key_policy TEXT NOT NULL DEFAULT ''`,
	}},
	{5, "service upstream timeouts", []string{
		`ALTER TABLE services ADD COLUMN header_timeout_ms BIGINT NOT NULL DEFAULT 0`,
		`ALTER TABLE services ADD COLUMN idle_timeout_ms BIGINT NOT NULL DEFAULT 0`,
		`ALTER TABLE services ADD COLUMN request_timeout_ms BIGINT NOT NULL DEFAULT 0`,
	}},
	{6, "admin users, sessions, audit log", []string{
		`CREATE TABLE admin_users (
			id TEXT PRIMARY KEY,
			username TEXT NOT NULL UNIQUE,
			password_hash TEXT NOT NULL,
			role TEXT NOT NULL,
			disabled BOOLEAN NOT NULL DEFAULT FALSE,
			last_login_at {ts},
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`CREATE TABLE admin_sessions (
			hash {blob} PRIMARY KEY,
			user_id TEXT NOT NULL REFERENCES admin_users(id) ON DELETE CASCADE,
			addr TEXT NOT NULL DEFAULT '',
			created_at {ts} NOT NULL,
			expires_at {ts} NOT NULL
		)`,
		`CREATE INDEX admin_sessions_user ON admin_sessions (user_id)`,
		`CREATE INDEX admin_sessions_expires ON admin_sessions (expires_at)`,
		`CREATE TABLE audit_log (
			id {autoid},
			ts {ts} NOT NULL,
			actor TEXT NOT NULL DEFAULT '',
			action TEXT NOT NULL DEFAULT '',
			target TEXT NOT NULL DEFAULT '',
			addr TEXT NOT NULL DEFAULT '',
			status INTEGER NOT NULL DEFAULT 0
		)`,
		`CREATE INDEX audit_log_ts ON audit_log (ts)`,
	}},
	{7, "usage record ids: a record is stored once", []string{
		// NULL for rows written before: NULLs never conflict.
		`ALTER TABLE usage_records ADD COLUMN record_id TEXT`,
		`CREATE UNIQUE INDEX usage_record_id ON usage_records (record_id)`,
	}},
	{8, "users an admin disabled", []string{
		`ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE`,
	}},
	{9, "descriptions on services, teams and tokens; services switched off", []string{
		`ALTER TABLE services ADD COLUMN description TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE services ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE`,
		`ALTER TABLE teams ADD COLUMN description TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE tokens ADD COLUMN description TEXT NOT NULL DEFAULT ''`,
	}},
	{10, "tiers: named features with requests per minute; keys join a tier", []string{
		`CREATE TABLE tiers (
			name TEXT PRIMARY KEY,
			description TEXT NOT NULL DEFAULT '',
			features TEXT NOT NULL DEFAULT '',
			created_at {ts} NOT NULL,
			updated_at {ts} NOT NULL
		)`,
		`ALTER TABLE keys ADD COLUMN tier TEXT NOT NULL DEFAULT ''`,
	}},
	{11, "routers: services of kind router with model routes; usage records name the router", []string{
		`ALTER TABLE services ADD COLUMN kind TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE services ADD COLUMN routes TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE usage_records ADD COLUMN router TEXT NOT NULL DEFAULT ''`,
	}},
	{12, "router settings: a router's attempt budget and breakers", []string{
		`ALTER TABLE services ADD COLUMN router TEXT NOT NULL DEFAULT ''`,
	}},
}

// latestVersion is the schema version this package writes.
var latestVersion = migrations[len(migrations)-1].version

func (s *Store) dialect() *strings.Replacer {
	if s.kind == kindPostgres {
		return strings.NewReplacer("{blob}", "BYTEA", "{ts}", "TIMESTAMPTZ", "{float}", "DOUBLE PRECISION",
			"{autoid}", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
	}
	return strings.NewReplacer("{blob}", "BLOB", "{ts}", "DATETIME", "{float}", "REAL",
		"{autoid}", "INTEGER PRIMARY KEY")
}

// migrationLockID is the PostgreSQL advisory lock key held while
// migrating ("keypool" in ASCII).
const migrationLockID = 0x6b6579706f6f6c

// migrateTo applies every migration up to and including version target.
func (s *Store) migrateTo(ctx context.Context, target int) error {
	db := s.w.WithContext(ctx)
	if s.kind == kindSQLite {
		// One BEGIN IMMEDIATE transaction: processes that open the same
		// file at once migrate one after the other.
		err := db.Transaction(func(tx *gorm.DB) error { return s.applyMigrations(tx, target, false) })
		if err != nil {
			return fmt.Errorf("sqlstore: migrate: %w", err)
		}
		return nil
	}
	err := db.Connection(func(conn *gorm.DB) error {
		if err := conn.Exec("SELECT pg_advisory_lock(?)", migrationLockID).Error; err != nil {
			return fmt.Errorf("advisory lock: %w", err)
		}
		defer func() {
			// Unlock even if ctx is done; closing the session would also
			// release it.
			_ = conn.WithContext(context.WithoutCancel(ctx)).Exec("SELECT pg_advisory_unlock(?)", migrationLockID).Error
		}()
		return s.applyMigrations(conn, target, true)
	})
	if err != nil {
		return fmt.Errorf("sqlstore: migrate: %w", err)
	}
	return nil
}

// applyMigrations runs on db (a transaction on SQLite, a locked session on
// PostgreSQL, where each migration gets its own transaction when perTx).
func (s *Store) applyMigrations(db *gorm.DB, target int, perTx bool) error {
	if err := db.Exec(s.dialect().Replace(`CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY,
		applied_at {ts} NOT NULL
	)`)).Error; err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	var applied []int
	if err := db.Raw("SELECT version FROM schema_migrations ORDER BY version").Scan(&applied).Error; err != nil {
		return fmt.Errorf("read schema_migrations: %w", err)
	}
	done := make(map[int]bool, len(applied))
	for _, v := range applied {
		done[v] = true
		if v > latestVersion {
			return fmt.Errorf("database schema version %d is newer than this build supports (%d)", v, latestVersion)
		}
	}
	rep := s.dialect()
	for _, m := range migrations {
		if m.version > target || done[m.version] {
			continue
		}
		apply := func(tx *gorm.DB) error {
			for _, stmt := range m.stmts {
				if err := tx.Exec(rep.Replace(stmt)).Error; err != nil {
					return fmt.Errorf("version %d (%s): %w", m.version, m.name, err)
				}
			}
			return tx.Exec("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", m.version, s.now()).Error
		}
		var err error
		if perTx {
			err = db.Transaction(apply)
		} else {
			err = apply(db)
		}
		if err != nil {
			return err
		}
		s.log.Info("sqlstore: applied schema migration", "version", m.version, "name", m.name, "database", s.kind)
	}
	return nil
}

// schemaVersion returns the highest applied migration.
func (s *Store) schemaVersion(ctx context.Context) (int, error) {
	var v *int
	err := s.r.WithContext(ctx).Raw("SELECT MAX(version) FROM schema_migrations").Scan(&v).Error
	if err != nil || v == nil {
		return 0, err
	}
	return *v, nil
}
