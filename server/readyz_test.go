package server_test

import (
	"context"
	"database/sql"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store/storetest"
)

// TestReadyzOnPostgres: /readyz stays 200 while PostgreSQL terminates
// keypoold's connections (they reconnect at once), and fails with 503 and
// a detail while the database is read-only (writes would fail with
// SQLSTATE 25006), and is ready again once it is writable.
func TestReadyzOnPostgres(t *testing.T) {
	dsn := storetest.PostgresDSN(t)
	u, _ := url.Parse(dsn)
	dbName := strings.TrimPrefix(u.Path, "/")
	admin, err := sql.Open("pgx", os.Getenv(storetest.PostgresEnv))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx := context.Background()
	terminate := func() int {
		t.Helper()
		var n int
		if err := admin.QueryRowContext(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
			WHERE datname = $1 AND pid <> pg_backend_pid()`, dbName).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	k := startKP(t, func(c *server.Config) { c.Database = server.SecretURL(dsn) })
	ready := func() (int, string) {
		st, body, _ := k.do("GET", "/readyz", "", nil)
		msg := ""
		if e, ok := body["error"].(map[string]any); ok {
			msg, _ = e["message"].(string)
		}
		return st, msg
	}
	if st, msg := ready(); st != http.StatusOK {
		t.Fatalf("readyz before: %d %s", st, msg)
	}
	for i := range 5 {
		if n := terminate(); n == 0 && i == 0 {
			t.Fatal("no keypoold connection to terminate")
		}
		// Asked at once, and again while the pool reconnects.
		for range 10 {
			if st, msg := ready(); st != http.StatusOK {
				t.Fatalf("round %d: readyz after pg_terminate_backend: %d %s", i, st, msg)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	if _, err := admin.ExecContext(ctx, "ALTER DATABASE "+dbName+" SET default_transaction_read_only = on"); err != nil {
		t.Fatal(err)
	}
	terminate() // new sessions are read-only
	st, msg := ready()
	if st != http.StatusServiceUnavailable || !strings.Contains(msg, "read-only") {
		t.Fatalf("readyz on a read-only database: %d %q", st, msg)
	}
	if _, err := admin.ExecContext(ctx, "ALTER DATABASE "+dbName+" RESET default_transaction_read_only"); err != nil {
		t.Fatal(err)
	}
	terminate()
	if st, msg := ready(); st != http.StatusOK {
		t.Fatalf("readyz once writable again: %d %s", st, msg)
	}
}

// TestReadyzStoreGone: /readyz asks the store now; once its database
// cannot answer a query, it fails at once.
func TestReadyzStoreGone(t *testing.T) {
	k := startKP(t)
	if st, _, _ := k.do("GET", "/readyz", "", nil); st != http.StatusOK {
		t.Fatalf("readyz: %d", st)
	}
	_ = k.srv.Store().Close()
	st, body, _ := k.do("GET", "/readyz", "", nil)
	if e, _ := body["error"].(map[string]any); st != http.StatusServiceUnavailable || !strings.Contains(e["message"].(string), "store unreachable") {
		t.Fatalf("readyz with the store closed: %d %v", st, body)
	}
}
