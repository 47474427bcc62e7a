package storetest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver
)

// PostgresEnv names the environment variable that holds the DSN of a
// PostgreSQL server for tests, e.g.
// postgres://postgres@127.0.0.1:5432/test?sslmode=disable.
const PostgresEnv = "KEYPOOL_TEST_POSTGRES"

// PostgresDSN returns the DSN of a fresh, empty scratch database named
// keypool_test_<random> on the server named by $KEYPOOL_TEST_POSTGRES, and
// drops it (terminating leftover sessions) when t ends. It skips t when the
// variable is unset and fails it when the server cannot be reached.
func PostgresDSN(t testing.TB) string {
	t.Helper()
	base := os.Getenv(PostgresEnv)
	if base == "" {
		t.Skipf("%s is not set; skipping PostgreSQL test", PostgresEnv)
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatalf("storetest: %s is not a URL", PostgresEnv)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "keypool_test_" + hex.EncodeToString(b[:])

	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatalf("storetest: open PostgreSQL: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		_ = admin.Close()
		t.Fatalf("storetest: create scratch database: %v", err)
	}
	t.Cleanup(func() {
		defer admin.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("storetest: drop scratch database %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}
