package external

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// pgEnv is a scratch PostgreSQL database with a credential table, a
// renamed table in another schema, and a role that may only SELECT them.
type pgEnv struct {
	ownerDSN string  // superuser, scratch database
	roleDSN  string  // SELECT-only role, scratch database
	owner    *sql.DB // the owning system's connection
	role     string
}

// newPG creates the scratch database and role from KEYPOOL_TEST_POSTGRES,
// and drops both at cleanup. It skips only when the variable is unset.
func newPG(t *testing.T) *pgEnv {
	t.Helper()
	base := os.Getenv("KEYPOOL_TEST_POSTGRES")
	if base == "" {
		t.Skip("KEYPOOL_TEST_POSTGRES not set")
	}
	ctx := context.Background()
	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.Close() })
	if err := admin.PingContext(ctx); err != nil {
		t.Fatalf("KEYPOOL_TEST_POSTGRES: %v", err)
	}
	suffix := randHex(t)
	dbName, role := "keypool_ext_"+suffix, "keypool_ext_ro_"+suffix
	mustExec(t, admin, `CREATE DATABASE `+dbName)
	t.Cleanup(func() {
		// WITH (FORCE) ends any session still open (PostgreSQL 13+).
		if _, err := admin.Exec(`DROP DATABASE IF EXISTS ` + dbName + ` WITH (FORCE)`); err != nil {
			t.Errorf("drop database: %v", err)
		}
		if _, err := admin.Exec(`DROP ROLE IF EXISTS ` + role); err != nil {
			t.Errorf("drop role: %v", err)
		}
	})

	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + dbName
	ownerDSN := u.String()
	owner, err := sql.Open("pgx", ownerDSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = owner.Close() })

	mustExec(t, owner, `CREATE TABLE credentials (
		id SERIAL PRIMARY KEY,
		service TEXT NOT NULL,
		api_key TEXT NOT NULL,
		email TEXT,
		quota_total INTEGER,
		quota_used INTEGER DEFAULT 0,
		quota_unit TEXT DEFAULT 'requests',
		status TEXT DEFAULT 'active',
		last_usage_check TIMESTAMP,
		extra_metadata TEXT,
		created_at TIMESTAMP,
		updated_at TIMESTAMP)`)
	for _, r := range fixture {
		var meta any
		if r.meta != "" {
			meta = r.meta
		}
		total, used := r.total, r.used
		if f, ok := total.(float64); ok { // INTEGER columns here
			total = int(f)
		}
		if f, ok := used.(float64); ok {
			used = int(f)
		}
		mustExec(t, owner, `INSERT INTO credentials (id, service, api_key, email, quota_total, quota_used, quota_unit, status, extra_metadata, created_at, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)`,
			r.id, r.service, r.key, r.email, total, used, r.unit, r.status, meta, created)
	}
	mustExec(t, owner, `CREATE SCHEMA regbot`)
	mustExec(t, owner, `CREATE TABLE regbot.accounts (
		key_id UUID PRIMARY KEY, provider TEXT, secret TEXT, quota NUMERIC(12,4), meta JSONB,
		state TEXT, modified TIMESTAMPTZ)`)
	mustExec(t, owner, `INSERT INTO regbot.accounts VALUES
		('6f1c2a3e-0000-4000-8000-000000000001', 'exaai', 'exa-pg-renamed-000000000001', 12.5, '{"tier":"pro","n":1}', 'live', '2025-03-02 10:00:00+00'),
		('6f1c2a3e-0000-4000-8000-000000000002', 'exaai', 'exa-pg-renamed-000000000002', NULL, '"scalar"', 'dead', NULL)`)

	mustExec(t, admin, `CREATE ROLE `+role+` LOGIN`)
	mustExec(t, owner, `GRANT CONNECT ON DATABASE `+dbName+` TO `+role)
	mustExec(t, owner, `REVOKE CREATE ON SCHEMA public FROM PUBLIC`)
	mustExec(t, owner, `GRANT USAGE ON SCHEMA public, regbot TO `+role)
	mustExec(t, owner, `GRANT SELECT ON credentials, regbot.accounts TO `+role)

	ru := *u
	ru.User = url.User(role) // pg_hba on the test server trusts 127.0.0.1
	return &pgEnv{ownerDSN: ownerDSN, roleDSN: ru.String(), owner: owner, role: role}
}

func TestPostgresSelectOnlyRole(t *testing.T) {
	env := newPG(t)
	ctx := context.Background()

	// The role really has nothing but SELECT: a plain connection as it
	// (without our read-only session setting) cannot write.
	plain, err := sql.Open("pgx", env.roleDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	_, err = plain.ExecContext(ctx, `UPDATE credentials SET status = 'x'`)
	if code := pgCode(err); code != "42501" {
		t.Fatalf("role write: err %v (code %q), want insufficient_privilege", err, code)
	}

	s := open(t, env.roleDSN, Config{Services: map[string]string{"exa": "exaai"}})
	tests := []struct {
		service string
		want    []string
	}{
		{"exa", []string{"exa/ext_1", "exa/ext_2"}},
		{"groq", []string{"groq/ext_5"}},
		{"", []string{"exa/ext_1", "exa/ext_2", "groq/ext_5", "tavily/ext_6"}},
	}
	for _, tt := range tests {
		t.Run("service="+tt.service, func(t *testing.T) {
			keys, err := s.Keys(ctx, tt.service)
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(keys); !slices.Equal(got, tt.want) {
				t.Fatalf("keys = %v, want %v", got, tt.want)
			}
		})
	}
	keys, _ := s.Keys(ctx, "exa")
	k := keys[0]
	if k.Secret.Reveal() != keyExa1 || k.BalanceTotal != 1000 || k.BalanceUsed != 10 || k.BalanceUnit != "requests" ||
		k.AccountEmail != "a1@example.com" || k.Labels["tier"] != "free" || !k.CreatedAt.Equal(created) {
		t.Errorf("key = %+v", k)
	}
	if ext, err := s.ExternalServices(ctx); err != nil || !slices.Equal(ext, []string{"exaai", "groq", "tavily"}) {
		t.Errorf("ExternalServices = %v, %v", ext, err)
	}

	// The owner suspends a key: Version changes and the next read is fresh.
	v1, err := s.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, env.owner, `UPDATE credentials SET status = 'suspended', updated_at = now() WHERE id = 1`)
	v2, err := s.Version(ctx)
	if err != nil || v2 == v1 {
		t.Fatalf("Version %q → %q, %v", v1, v2, err)
	}
	if keys, _ := s.Keys(ctx, "exa"); !slices.Equal(ids(keys), []string{"exa/ext_2"}) {
		t.Errorf("after suspend keys = %v", ids(keys))
	}

	t.Run("renamed schema-qualified table, uuid ids, numeric and jsonb", func(t *testing.T) {
		s := open(t, env.roleDSN, Config{
			Table: "regbot.accounts",
			Columns: Columns{ID: "key_id", Service: "provider", APIKey: "secret", QuotaTotal: "quota",
				QuotaUsed: Absent, QuotaUnit: Absent, Email: Absent, Status: "state", ExtraMetadata: "meta",
				CreatedAt: Absent, UpdatedAt: "modified"},
			ActiveStatus: "live",
			Services:     map[string]string{"exa": "exaai"},
		})
		keys, err := s.Keys(ctx, "exa")
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(keys); !slices.Equal(got, []string{"exa/ext_6f1c2a3e-0000-4000-8000-000000000001"}) {
			t.Fatalf("keys = %v", got)
		}
		k := keys[0]
		if k.BalanceTotal != 12.5 || k.Labels["tier"] != "pro" || len(k.Labels) != 1 ||
			!k.UpdatedAt.Equal(time.Date(2025, 3, 2, 10, 0, 0, 0, time.UTC)) {
			t.Errorf("key = %+v", k)
		}
		if _, err := s.Version(ctx); err != nil {
			t.Error(err)
		}
	})

	t.Run("errors carry no secret", func(t *testing.T) {
		s := open(t, env.roleDSN, Config{Columns: Columns{QuotaTotal: "api_key"}})
		_, err := s.Keys(ctx, "groq")
		if err == nil {
			t.Fatal("no error")
		}
		_, err2 := Open(ctx, env.roleDSN, Config{Columns: Columns{Email: "no_such_column"}})
		if err2 == nil {
			t.Fatal("Open with a missing column succeeded")
		}
		for _, e := range []error{err, err2} {
			for _, sec := range allSecrets {
				if strings.Contains(e.Error(), sec) {
					t.Fatalf("error leaks a secret: %v", e)
				}
			}
		}
	})
}

// TestPostgresSessionReadOnly proves the Source's own sessions are
// read-only even when its role could write: it connects as the superuser.
func TestPostgresSessionReadOnly(t *testing.T) {
	env := newPG(t)
	ctx := context.Background()
	s := open(t, env.ownerDSN, Config{})
	var ro string
	if err := s.db.QueryRowContext(ctx, `SHOW default_transaction_read_only`).Scan(&ro); err != nil || ro != "on" {
		t.Fatalf("default_transaction_read_only = %q, %v", ro, err)
	}
	for _, q := range []string{
		`UPDATE credentials SET status = 'hacked'`,
		`INSERT INTO credentials (service, api_key) VALUES ('x', 'y')`,
		`DELETE FROM credentials`,
		`CREATE TABLE t (x INTEGER)`,
	} {
		_, err := s.db.ExecContext(ctx, q)
		if code := pgCode(err); code != "25006" {
			t.Errorf("%s: err %v (code %q), want read_only_sql_transaction", q, err, code)
		}
	}
	var n int
	if err := env.owner.QueryRowContext(ctx, `SELECT count(*) FROM credentials WHERE status = 'hacked'`).Scan(&n); err != nil || n != 0 {
		t.Errorf("rows changed: %d, %v", n, err)
	}
}

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func mustExec(t *testing.T, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

func randHex(t *testing.T) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
