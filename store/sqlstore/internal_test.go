package sqlstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/storetest"
)

// backends runs fn against SQLite and, when configured, PostgreSQL; dsn
// returns a fresh database each call.
func backends(t *testing.T, fn func(t *testing.T, dsn func(t *testing.T) string)) {
	t.Run("sqlite", func(t *testing.T) {
		fn(t, func(t *testing.T) string { return sqliteDSN(t) })
	})
	t.Run("postgres", func(t *testing.T) {
		storetest.PostgresDSN(t) // skip when unset
		fn(t, func(t *testing.T) string { return storetest.PostgresDSN(t) })
	})
}

func TestSQLitePath(t *testing.T) {
	tests := []struct{ dsn, path, query string }{
		{"sqlite:./data/keypool.db", "./data/keypool.db", ""},
		{"sqlite:///var/lib/k.db", "/var/lib/k.db", ""},
		{"file:k.db?cache=shared", "k.db", "cache=shared"},
		{"/tmp/k.db", "/tmp/k.db", ""},
	}
	for _, tt := range tests {
		t.Run(tt.dsn, func(t *testing.T) {
			p, q := sqlitePath(tt.dsn)
			if p != tt.path || q != tt.query {
				t.Fatalf("sqlitePath(%q) = %q, %q; want %q, %q", tt.dsn, p, q, tt.path, tt.query)
			}
		})
	}
}

func TestOpenCreatesDirectoryAndPlainPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a", "b", "k.db")
	s := openAt(t, path, Options{})
	if err := s.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestSQLiteConcurrentWriters runs 50 writers over two Store instances on
// one file (as two processes would) and wants no error at all, in
// particular no SQLITE_BUSY.
func TestSQLiteConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	dsn := sqliteDSN(t)
	kr := testKeyring(t)
	a := openAt(t, dsn, Options{Keyring: kr})
	b := openAt(t, dsn, Options{Keyring: kr})
	if err := a.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
		t.Fatal(err)
	}
	const writers, each = 50, 10
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for i := range writers {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range each {
				v := keypool.Secret(fmt.Sprintf("value-%03d-%03d-xxxxxxxx", i, j))
				if err := s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: v}}); err != nil {
					errs <- err
				}
				if err := s.AppendUsage(ctx, []store.UsageRecord{{Service: "svc", Status: 200}}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	ks, err := b.Keys(ctx, "svc")
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != writers*each {
		t.Fatalf("%d keys, want %d", len(ks), writers*each)
	}
}

func TestMigrations(t *testing.T) {
	backends(t, func(t *testing.T, dsn func(t *testing.T) string) {
		ctx := context.Background()
		t.Run("open twice is a no-op", func(t *testing.T) {
			d := dsn(t)
			kr := testKeyring(t)
			s1 := openAt(t, d, Options{Keyring: kr})
			if err := s1.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
				t.Fatal(err)
			}
			v1, _ := s1.Version(ctx)
			s2 := openAt(t, d, Options{Keyring: kr})
			var n int64
			if err := s2.r.Raw("SELECT COUNT(*) FROM schema_migrations").Scan(&n).Error; err != nil {
				t.Fatal(err)
			}
			if n != int64(len(migrations)) {
				t.Fatalf("%d migration rows, want %d", n, len(migrations))
			}
			if v2, _ := s2.Version(ctx); v2 != v1 {
				t.Fatalf("version changed on reopen: %s → %s", v1, v2)
			}
		})
		t.Run("upgrade from v1 keeps data", func(t *testing.T) {
			d := dsn(t)
			kr := testKeyring(t)
			old, err := open(ctx, d, Options{Keyring: kr, Logger: quiet}, 1)
			if err != nil {
				t.Fatal(err)
			}
			if v, _ := old.schemaVersion(ctx); v != 1 {
				t.Fatalf("fixture at schema %d, want 1", v)
			}
			// Write v1 rows by hand: the v1 keys table has no status_reason.
			now := time.Now().UTC()
			row := keyRow{ID: "key_v1", Service: "svc"}
			old.fpKey = bytes.Repeat([]byte{1}, 32) // replaced below by the stored one
			if err := old.loadFingerprintKey(ctx); err != nil {
				t.Fatal(err)
			}
			if err := old.sealKey(&row, "sk-from-schema-v1-0001"); err != nil {
				t.Fatal(err)
			}
			for _, q := range []struct {
				sql  string
				args []any
			}{
				{"INSERT INTO services (name, base_url, created_at, updated_at) VALUES ('svc', 'https://x', ?, ?)", []any{now, now}},
				{`INSERT INTO keys (id, service, ciphertext, key_version, fingerprint, hint, created_at, updated_at)
					VALUES (?, 'svc', ?, ?, ?, ?, ?, ?)`, []any{row.ID, row.Ciphertext, row.KeyVersion, row.Fingerprint, row.Hint, now, now}},
				{"INSERT INTO teams (id, name, created_at, updated_at) VALUES ('team_v1', 'old team', ?, ?)", []any{now, now}},
				{"INSERT INTO usage_records (ts, team_id, service, tokens_in) VALUES (?, 'team_v1', 'svc', 7)", []any{now.UnixMicro()}},
			} {
				if err := old.w.Exec(q.sql, q.args...).Error; err != nil {
					t.Fatal(err)
				}
			}
			_ = old.Close()

			s := openAt(t, d, Options{Keyring: kr})
			if v, _ := s.schemaVersion(ctx); v != latestVersion {
				t.Fatalf("schema %d after upgrade, want %d", v, latestVersion)
			}
			k, err := s.GetKey(ctx, "key_v1")
			if err != nil {
				t.Fatal(err)
			}
			if k.Secret != "sk-from-schema-v1-0001" || k.StatusReason != "" {
				t.Fatalf("upgraded key: %+v", k)
			}
			if err := s.SetKeyStatus(ctx, "key_v1", store.StatusInvalid, "new column works"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.GetTeam(ctx, "team_v1"); err != nil {
				t.Fatal(err)
			}
			rows, err := s.QueryUsage(ctx, store.UsageQuery{Team: "team_v1"})
			if err != nil || len(rows) != 1 || rows[0].TokensIn != 7 {
				t.Fatalf("usage after upgrade: %+v, %v", rows, err)
			}
			err = s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: "sk-from-schema-v1-0001"}})
			if !errors.Is(err, store.ErrConflict) {
				t.Fatalf("duplicate of a v1 key: %v, want conflict", err)
			}
		})
		t.Run("upgrade from v2 adds llm_family", func(t *testing.T) {
			d := dsn(t)
			kr := testKeyring(t)
			old, err := open(ctx, d, Options{Keyring: kr, Logger: quiet}, 2)
			if err != nil {
				t.Fatal(err)
			}
			now := time.Now().UTC()
			if err := old.w.Exec(`INSERT INTO services (name, base_url, prices, created_at, updated_at)
				VALUES ('llm', 'https://x', '{"m":{"input":1}}', ?, ?)`, now, now).Error; err != nil {
				t.Fatal(err)
			}
			_ = old.Close()
			s := openAt(t, d, Options{Keyring: kr})
			sv, err := s.GetService(ctx, "llm")
			if err != nil || sv.LLMFamily != "" || sv.Prices != `{"m":{"input":1}}` {
				t.Fatalf("upgraded service: %+v, %v", sv, err)
			}
			sv.LLMFamily = "anthropic"
			if err := s.UpdateService(ctx, &sv); err != nil {
				t.Fatal(err)
			}
			if got, _ := s.GetService(ctx, "llm"); got.LLMFamily != "anthropic" {
				t.Fatalf("llm_family after update = %q", got.LLMFamily)
			}
		})
		t.Run("newer schema is refused", func(t *testing.T) {
			d := dsn(t)
			s := openAt(t, d, Options{})
			if err := s.w.Exec("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", latestVersion+1, time.Now()).Error; err != nil {
				t.Fatal(err)
			}
			if _, err := Open(ctx, d, Options{Logger: quiet}); err == nil || !strings.Contains(err.Error(), "newer") {
				t.Fatalf("Open of a newer schema: %v", err)
			}
		})
		t.Run("replicas start at once", func(t *testing.T) {
			d := dsn(t)
			kr := testKeyring(t)
			const n = 4
			var wg sync.WaitGroup
			errs := make([]error, n)
			stores := make([]*Store, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					stores[i], errs[i] = Open(ctx, d, Options{Keyring: kr, Logger: quiet})
				}()
			}
			wg.Wait()
			for i := range n {
				if errs[i] != nil {
					t.Fatalf("replica %d: %v", i, errs[i])
				}
				defer stores[i].Close()
			}
			// All replicas agree on the fingerprint key.
			for i := 1; i < n; i++ {
				if !bytes.Equal(stores[i].fpKey, stores[0].fpKey) {
					t.Fatal("replicas hold different fingerprint keys")
				}
			}
		})
	})
}

func TestSecretsAtRest(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "k.db")
	s := openAt(t, "sqlite:"+path, Options{Keyring: testKeyring(t)})
	if err := s.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
		t.Fatal(err)
	}
	var secrets []string
	var keys []*store.Key
	for i := range 20 {
		v := fmt.Sprintf("sk-SUPERSECRET-%02d-4f1c9a7e2b6d", i)
		secrets = append(secrets, v)
		keys = append(keys, &store.Key{Service: "svc", Secret: keypool.Secret(v)})
	}
	if err := s.CreateKeys(ctx, keys); err != nil {
		t.Fatal(err)
	}
	keys[0].Secret = "sk-SUPERSECRET-updated-4f1c9a7e"
	secrets = append(secrets, keys[0].Secret.Reveal())
	if err := s.UpdateKey(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	// Inspect the main file and the WAL before and after a checkpoint.
	check := func(stage string) {
		t.Helper()
		for _, f := range []string{path, path + "-wal"} {
			b, err := os.ReadFile(f)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(b, []byte("SUPERSECRET")) {
				t.Fatalf("%s: %s contains key bytes", stage, filepath.Base(f))
			}
		}
	}
	if _, err := os.Stat(path + "-wal"); err != nil {
		t.Fatalf("no WAL file: %v", err)
	}
	check("before checkpoint")
	if err := s.w.Exec("PRAGMA wal_checkpoint(FULL)").Error; err != nil {
		t.Fatal(err)
	}
	check("after checkpoint")
	// And the secrets still open.
	ks, err := s.Keys(ctx, "svc")
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 20 {
		t.Fatalf("%d keys", len(ks))
	}
}

func TestKeyringFailsClosed(t *testing.T) {
	backends(t, func(t *testing.T, dsn func(t *testing.T) string) {
		ctx := context.Background()
		d := dsn(t)
		kr := testKeyring(t)
		s, err := Open(ctx, d, Options{Keyring: kr, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
			t.Fatal(err)
		}
		ks := []*store.Key{{Service: "svc", Secret: "sk-aaaaaaaaaaaaaaaaaaaa"}, {Service: "svc", Secret: "sk-bbbbbbbbbbbbbbbbbbbb"}}
		if err := s.CreateKeys(ctx, ks); err != nil {
			t.Fatal(err)
		}
		t.Run("ciphertext moved to another row does not open", func(t *testing.T) {
			var ct []byte
			if err := s.r.Raw("SELECT ciphertext FROM keys WHERE id = ?", ks[0].ID).Row().Scan(&ct); err != nil {
				t.Fatal(err)
			}
			if err := s.w.Exec("UPDATE keys SET ciphertext = ? WHERE id = ?", ct, ks[1].ID).Error; err != nil {
				t.Fatal(err)
			}
			_, err := s.GetKey(ctx, ks[1].ID)
			if !errors.Is(err, seal.ErrOpen) {
				t.Fatalf("GetKey of a moved ciphertext: %v, want seal.ErrOpen", err)
			}
			if _, err := s.Keys(ctx, ""); !errors.Is(err, seal.ErrOpen) {
				t.Fatalf("Keys with a moved ciphertext: %v, want seal.ErrOpen", err)
			}
			if err := s.DeleteKey(ctx, ks[1].ID); err != nil {
				t.Fatal(err)
			}
		})
		_ = s.Close()

		t.Run("no keyring", func(t *testing.T) {
			_, err := Open(ctx, d, Options{Logger: quiet})
			if !errors.Is(err, ErrNoKeyring) {
				t.Fatalf("Open without keyring: %v, want ErrNoKeyring", err)
			}
		})
		t.Run("wrong keyring", func(t *testing.T) {
			wrongHex, _ := seal.GenerateKey()
			_, err := Open(ctx, d, Options{Keyring: testKeyring(t, wrongHex), Logger: quiet})
			if !errors.Is(err, seal.ErrUnknownKey) || !strings.Contains(err.Error(), kr.Current().String()) {
				t.Fatalf("Open with a wrong keyring: %v, want ErrUnknownKey naming %s", err, kr.Current())
			}
			if strings.Contains(err.Error(), wrongHex) {
				t.Fatal("error contains key material")
			}
		})
		t.Run("no keyring, no keys", func(t *testing.T) {
			s := openAt(t, dsn(t), Options{})
			if err := s.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
				t.Fatal(err)
			}
			err := s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: "sk-cccccccccccccccccc"}})
			if !errors.Is(err, ErrNoKeyring) {
				t.Fatalf("CreateKeys without keyring: %v", err)
			}
		})
	})
}

func TestRewrap(t *testing.T) {
	backends(t, func(t *testing.T, dsn func(t *testing.T) string) {
		ctx := context.Background()
		d := dsn(t)
		k1, _ := seal.GenerateKey()
		k2, _ := seal.GenerateKey()
		s1, err := Open(ctx, d, Options{Keyring: testKeyring(t, k1), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := s1.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
			t.Fatal(err)
		}
		var keys []*store.Key
		for i := range 1234 {
			keys = append(keys, &store.Key{Service: "svc", Secret: keypool.Secret(fmt.Sprintf("sk-rewrap-%05d-zzzz", i))})
		}
		if err := s1.CreateKeys(ctx, keys); err != nil {
			t.Fatal(err)
		}
		_ = s1.Close()

		// Rotate: new key first, old still opens; the store serves meanwhile.
		s2 := openAt(t, d, Options{Keyring: testKeyring(t, k2, k1)})
		v0, _ := s2.Version(ctx)
		done := make(chan error, 1)
		go func() {
			for i := range 20 {
				if _, err := s2.Keys(ctx, "svc"); err != nil {
					done <- err
					return
				}
				if err := s2.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: keypool.Secret(fmt.Sprintf("sk-during-%02d-zzzzzz", i))}}); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
		n, err := s2.Rewrap(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("serving during rewrap: %v", err)
		}
		if n != 1234+1 { // every key and the fingerprint key
			t.Fatalf("re-sealed %d values, want %d", n, 1234+1)
		}
		if v1, _ := s2.Version(ctx); v1 == v0 {
			t.Fatal("version unchanged by the concurrent CreateKeys")
		}
		if n, err := s2.Rewrap(ctx); err != nil || n != 0 {
			t.Fatalf("second Rewrap: %d, %v; want 0", n, err)
		}
		_ = s2.Close()

		// The old key can go now.
		s3 := openAt(t, d, Options{Keyring: testKeyring(t, k2)})
		ks, err := s3.Keys(ctx, "svc")
		if err != nil {
			t.Fatal(err)
		}
		if len(ks) != 1234+20 {
			t.Fatalf("%d keys, want %d", len(ks), 1234+20)
		}
		// Fingerprints survive rotation: duplicates still conflict.
		err = s3.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: "sk-rewrap-00007-zzzz"}})
		if !errors.Is(err, store.ErrConflict) {
			t.Fatalf("duplicate after rotation: %v, want conflict", err)
		}
	})
}

// TestPostgresReadOnlyFailover turns the only pooled connection read only,
// as a failover to a replica would, and wants the next write to succeed on
// a fresh connection.
func TestPostgresReadOnlyFailover(t *testing.T) {
	dsn := storetest.PostgresDSN(t)
	ctx := context.Background()
	s := openAt(t, dsn, Options{Keyring: testKeyring(t)})
	s.wsql.SetMaxOpenConns(1)

	var pid1 int
	if err := s.wsql.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.wsql.ExecContext(ctx, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"); err != nil {
		t.Fatal(err)
	}
	// The pooled connection now refuses writes.
	_, err := s.wsql.ExecContext(ctx, "INSERT INTO meta (name) VALUES ('probe')")
	if !isReadOnly(err) {
		t.Fatalf("setup: want a 25006 error, got %v", err)
	}

	for _, op := range []struct {
		name string
		fn   func() error
	}{
		{"CreateService", func() error { return s.CreateService(ctx, &store.Service{Name: "svc"}) }},
		{"CreateKeys", func() error {
			return s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: "sk-after-failover-0001"}})
		}},
		{"AppendUsage", func() error { return s.AppendUsage(ctx, []store.UsageRecord{{Service: "svc"}}) }},
	} {
		t.Run(op.name, func(t *testing.T) {
			if _, err := s.wsql.ExecContext(ctx, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"); err != nil {
				t.Fatal(err)
			}
			if err := op.fn(); err != nil {
				t.Fatalf("write after failover: %v", err)
			}
		})
	}
	var pid2 int
	if err := s.wsql.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid2); err != nil {
		t.Fatal(err)
	}
	if pid2 == pid1 {
		t.Fatal("the read-only connection was not replaced")
	}
}

func TestSQLitePragmas(t *testing.T) {
	s := openAt(t, sqliteDSN(t), Options{})
	for _, db := range []struct {
		name string
		s    *Store
		w    bool
	}{{"writer", s, true}, {"reader", s, false}} {
		t.Run(db.name, func(t *testing.T) {
			conn := s.r
			if db.w {
				conn = s.w
			}
			var mode string
			var fk, busy int
			if err := conn.Raw("PRAGMA journal_mode").Row().Scan(&mode); err != nil {
				t.Fatal(err)
			}
			if err := conn.Raw("PRAGMA foreign_keys").Row().Scan(&fk); err != nil {
				t.Fatal(err)
			}
			if err := conn.Raw("PRAGMA busy_timeout").Row().Scan(&busy); err != nil {
				t.Fatal(err)
			}
			if mode != "wal" || fk != 1 || busy != 10000 {
				t.Fatalf("journal_mode=%s foreign_keys=%d busy_timeout=%d", mode, fk, busy)
			}
		})
	}
	if s.wsql.Stats().MaxOpenConnections != 1 {
		t.Fatalf("writer pool allows %d connections, want 1", s.wsql.Stats().MaxOpenConnections)
	}
}
