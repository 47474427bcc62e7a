package external

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keypool/keypool/store"
)

const defaultSchema = `CREATE TABLE credentials (
	id INTEGER PRIMARY KEY AUTOINCREMENT,
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
	updated_at TIMESTAMP
)`

// row is one credentials row in the default schema.
type row struct {
	id                 int
	service, key       string
	email              string
	total, used        any
	unit, status, meta string
}

// Secrets used by the fixtures; tests check none of them leaks into errors.
const (
	keyExa1    = "exa-live-key-0000000000000001"
	keyExa2    = "exa-live-key-0000000000000002"
	keyExaExp  = "exa-expired-key-00000000000003"
	keyExaSusp = "exa-suspended-key-000000000004"
	keyGroq    = "gsk_groq_key_00000000000000005"
	keyTavily  = "tvly-key-00000000000000000006"
	keyFire    = "fc-key-0000000000000000000007"
)

var allSecrets = []string{keyExa1, keyExa2, keyExaExp, keyExaSusp, keyGroq, keyTavily, keyFire}

var fixture = []row{
	{1, "exaai", keyExa1, "a1@example.com", 1000, 10, "requests", "active", `{"tier":"free","feature":"search","n":3}`},
	{2, "exaai", keyExa2, "a2@example.com", 2000, 0, "credits", "active", ``},
	{3, "exaai", keyExaExp, "a3@example.com", 1000, 1000, "requests", "expired", ``},
	{4, "exaai", keyExaSusp, "a4@example.com", 1000, 5, "requests", "suspended", ``},
	{5, "groq", keyGroq, "g@example.com", nil, nil, "requests", "active", `not json`},
	{6, "tavily", keyTavily, "t@example.com", 5.5, 1.25, "usd", "active", `[1,2]`},
}

var created = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// newSQLite creates a writable SQLite file with the default schema and rows,
// returning its path and a read-write handle for the test to play the
// owning system.
func newSQLite(t *testing.T, rows []row) (string, *sql.DB) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "regbot.db")
	w, err := sql.Open("sqlite3", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	if _, err := w.Exec(defaultSchema); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		insertRow(t, w, r)
	}
	return path, w
}

func insertRow(t *testing.T, w *sql.DB, r row) {
	t.Helper()
	var meta any
	if r.meta != "" {
		meta = r.meta
	}
	_, err := w.Exec(`INSERT INTO credentials (id, service, api_key, email, quota_total, quota_used, quota_unit, status, extra_metadata, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.id, r.service, r.key, r.email, r.total, r.used, r.unit, r.status, meta, created, created)
	if err != nil {
		t.Fatal(err)
	}
}

func open(t *testing.T, dsn string, cfg Config) *Source {
	t.Helper()
	s, err := Open(context.Background(), dsn, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func ids(keys []store.Key) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.Service + "/" + k.ID
	}
	return out
}

func TestKeysDefaultSchema(t *testing.T) {
	path, _ := newSQLite(t, fixture)
	s := open(t, "sqlite:"+path, Config{Services: map[string]string{"exa": "exaai"}})
	ctx := context.Background()

	tests := []struct {
		name    string
		service string
		want    []string
	}{
		{"mapped name reads external rows, inactive excluded", "exa", []string{"exa/ext_1", "exa/ext_2"}},
		{"unmapped name maps to itself", "groq", []string{"groq/ext_5"}},
		{"external name used directly is its own keypool name", "exaai", []string{"exaai/ext_1", "exaai/ext_2"}},
		{"unknown service has no keys", "openai", []string{}},
		{"all services, reverse-mapped", "", []string{"exa/ext_1", "exa/ext_2", "groq/ext_5", "tavily/ext_6"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := s.Keys(ctx, tt.service)
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(keys); !slices.Equal(got, tt.want) {
				t.Fatalf("keys = %v, want %v", got, tt.want)
			}
		})
	}

	t.Run("fields", func(t *testing.T) {
		keys, err := s.Keys(ctx, "exa")
		if err != nil {
			t.Fatal(err)
		}
		k := keys[0]
		if k.Secret.Reveal() != keyExa1 || k.Hint != "exa-…0001" {
			t.Errorf("secret/hint = %q/%q", k.Secret.Reveal(), k.Hint)
		}
		if k.AccountEmail != "a1@example.com" || k.BalanceTotal != 1000 || k.BalanceUsed != 10 || k.BalanceUnit != "requests" {
			t.Errorf("account/quota = %q %v %v %q", k.AccountEmail, k.BalanceTotal, k.BalanceUsed, k.BalanceUnit)
		}
		if want := map[string]string{"tier": "free", "feature": "search"}; !mapsEqual(k.Labels, want) {
			t.Errorf("labels = %v, want %v (string values only)", k.Labels, want)
		}
		if k.Status != store.StatusActive || k.Origin != "external" {
			t.Errorf("status/origin = %q/%q", k.Status, k.Origin)
		}
		if !k.CreatedAt.Equal(created) || !k.UpdatedAt.Equal(created) {
			t.Errorf("times = %v %v, want %v", k.CreatedAt, k.UpdatedAt, created)
		}
		if keys[1].BalanceUnit != "credits" || keys[1].Labels != nil {
			t.Errorf("second key unit/labels = %q/%v", keys[1].BalanceUnit, keys[1].Labels)
		}
	})

	t.Run("null quota, invalid and non-object metadata", func(t *testing.T) {
		g, err := s.Keys(ctx, "groq")
		if err != nil {
			t.Fatal(err)
		}
		if g[0].BalanceTotal != 0 || g[0].BalanceUsed != 0 || g[0].Labels != nil {
			t.Errorf("groq = %v %v %v", g[0].BalanceTotal, g[0].BalanceUsed, g[0].Labels)
		}
		tv, err := s.Keys(ctx, "tavily")
		if err != nil {
			t.Fatal(err)
		}
		if tv[0].BalanceTotal != 5.5 || tv[0].BalanceUsed != 1.25 || tv[0].BalanceUnit != "usd" || tv[0].Labels != nil {
			t.Errorf("tavily = %+v", tv[0])
		}
	})

	t.Run("returned keys are the caller's", func(t *testing.T) {
		a, _ := s.Keys(ctx, "exa")
		a[0].Labels["tier"] = "changed"
		a[0].Service = "changed"
		b, _ := s.Keys(ctx, "exa")
		if b[0].Labels["tier"] != "free" || b[0].Service != "exa" {
			t.Errorf("cache was modified through a returned key: %+v", b[0])
		}
	})
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

func TestSharedExternalName(t *testing.T) {
	path, _ := newSQLite(t, fixture)
	s := open(t, "sqlite:"+path, Config{Services: map[string]string{"exa": "exaai", "exa-search": "exaai"}})
	ctx := context.Background()
	tests := []struct {
		service string
		want    []string
	}{
		{"exa", []string{"exa/ext_1", "exa/ext_2"}},
		{"exa-search", []string{"exa-search/ext_1", "exa-search/ext_2"}},
		{"", []string{"exa/ext_1", "exa-search/ext_1", "exa/ext_2", "exa-search/ext_2", "groq/ext_5", "tavily/ext_6"}},
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
	if got := s.MappedServices(); !slices.Equal(got, []string{"exa", "exa-search"}) {
		t.Errorf("MappedServices = %v", got)
	}
	if s.ExternalName("exa") != "exaai" || s.ExternalName("groq") != "groq" {
		t.Errorf("ExternalName exa=%q groq=%q", s.ExternalName("exa"), s.ExternalName("groq"))
	}
	ext, err := s.ExternalServices(ctx)
	if err != nil || !slices.Equal(ext, []string{"exaai", "groq", "tavily"}) {
		t.Errorf("ExternalServices = %v, %v", ext, err)
	}
	if svcs, err := s.Services(ctx); svcs != nil || err != nil {
		t.Errorf("Services = %v, %v; want nil, nil", svcs, err)
	}

	// SetServices swaps the mapping at run time.
	if err := s.SetServices(map[string]string{"search": "exaai"}); err != nil {
		t.Fatal(err)
	}
	keys, err := s.Keys(ctx, "search")
	if err != nil || !slices.Equal(ids(keys), []string{"search/ext_1", "search/ext_2"}) {
		t.Errorf("after SetServices: %v, %v", ids(keys), err)
	}
	if keys, _ := s.Keys(ctx, "exa"); len(keys) != 0 {
		t.Errorf("exa no longer mapped, got %v", ids(keys))
	}
	if err := s.SetServices(map[string]string{"": "x"}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("SetServices with empty name: %v", err)
	}
}

func TestRenamedSchema(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		ddl  []string
		cfg  Config
		want []store.Key
	}{
		{
			name: "every column renamed, schema-qualified table, text ids",
			ddl: []string{
				`CREATE TABLE accounts (key_id TEXT PRIMARY KEY, provider TEXT, secret_value TEXT, account TEXT,
					limit_total REAL, limit_used REAL, unit TEXT, state TEXT, meta TEXT, created TEXT, modified TEXT)`,
				`INSERT INTO accounts VALUES ('a-1', 'exaai', 'exa-renamed-key-000000001', 'r@example.com', 10.5, 2, 'usd', 'ok', '{"region":"eu"}', '2025-03-01 12:00:00', '2025-03-02T10:00:00Z')`,
				`INSERT INTO accounts VALUES ('a-2', 'exaai', 'exa-renamed-key-000000002', NULL, NULL, NULL, NULL, 'active', NULL, NULL, NULL)`,
			},
			cfg: Config{
				Table: "main.accounts",
				Columns: Columns{
					ID: "key_id", Service: "provider", APIKey: "secret_value", Email: "account",
					QuotaTotal: "limit_total", QuotaUsed: "limit_used", QuotaUnit: "unit", Status: "state",
					ExtraMetadata: "meta", CreatedAt: "created", UpdatedAt: "modified",
				},
				ActiveStatus: "ok",
				Services:     map[string]string{"exa": "exaai"},
			},
			want: []store.Key{{
				ID: "ext_a-1", Service: "exa", Hint: "exa-…0001", AccountEmail: "r@example.com",
				BalanceTotal: 10.5, BalanceUsed: 2, BalanceUnit: "usd", Labels: map[string]string{"region": "eu"},
				CreatedAt: created, UpdatedAt: time.Date(2025, 3, 2, 10, 0, 0, 0, time.UTC),
			}},
		},
		{
			name: "optional columns absent",
			ddl: []string{
				`CREATE TABLE keys (id INTEGER PRIMARY KEY, service TEXT, api_key TEXT, status TEXT)`,
				`INSERT INTO keys VALUES (7, 'exa', '  exa-minimal-key-00000007 ', 'active')`,
				`INSERT INTO keys VALUES (8, 'exa', '', 'active')`, // no key: skipped
			},
			cfg: Config{
				Table: "keys",
				Columns: Columns{Email: Absent, QuotaTotal: Absent, QuotaUsed: Absent, QuotaUnit: Absent,
					ExtraMetadata: Absent, CreatedAt: Absent, UpdatedAt: Absent},
			},
			want: []store.Key{{ID: "ext_7", Service: "exa", Hint: "exa-…0007"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "other.db")
			w, err := sql.Open("sqlite3", path)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			for _, q := range tt.ddl {
				if _, err := w.Exec(q); err != nil {
					t.Fatal(err)
				}
			}
			s := open(t, "sqlite:"+path, tt.cfg)
			keys, err := s.Keys(ctx, "exa")
			if err != nil {
				t.Fatal(err)
			}
			if len(keys) != len(tt.want) {
				t.Fatalf("keys = %v, want %d", ids(keys), len(tt.want))
			}
			for i, w := range tt.want {
				k := keys[i]
				if k.ID != w.ID || k.Service != w.Service || k.Hint != w.Hint || k.AccountEmail != w.AccountEmail ||
					k.BalanceTotal != w.BalanceTotal || k.BalanceUsed != w.BalanceUsed || k.BalanceUnit != w.BalanceUnit ||
					!mapsEqual(k.Labels, w.Labels) || !k.CreatedAt.Equal(w.CreatedAt) || !k.UpdatedAt.Equal(w.UpdatedAt) ||
					k.Status != store.StatusActive || k.Origin != Origin || strings.TrimSpace(k.Secret.Reveal()) != k.Secret.Reveal() {
					t.Errorf("key %d = %+v\nwant %+v", i, k, w)
				}
			}
			if _, err := s.Version(ctx); err != nil {
				t.Errorf("Version: %v", err)
			}
		})
	}
}

func TestConfigValidation(t *testing.T) {
	path, _ := newSQLite(t, fixture)
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"zero config", Config{}, true},
		{"schema-qualified table", Config{Table: "main.credentials"}, true},
		{"injection in table", Config{Table: "credentials; DROP TABLE credentials"}, false},
		{"quote in table", Config{Table: `credentials"--`}, false},
		{"three-part table", Config{Table: "a.b.c"}, false},
		{"empty schema part", Config{Table: ".credentials"}, false},
		{"space in column", Config{Columns: Columns{APIKey: "api key"}}, false},
		{"leading digit", Config{Columns: Columns{Service: "1service"}}, false},
		{"expression as column", Config{Columns: Columns{Status: "status OR 1=1"}}, false},
		{"required column absent", Config{Columns: Columns{APIKey: Absent}}, false},
		{"optional column absent", Config{Columns: Columns{Email: Absent}}, true},
		{"negative refresh", Config{Refresh: Duration(-time.Second)}, false},
		{"empty service mapping", Config{Services: map[string]string{"exa": ""}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(context.Background(), "sqlite:"+path, tt.cfg)
			if tt.ok {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				_ = s.Close()
				return
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Open err = %v, want ErrInvalidConfig", err)
			}
		})
	}
}

func TestDecodeConfig(t *testing.T) {
	want := Config{
		Table:        "creds",
		Columns:      Columns{APIKey: "key_value"},
		ActiveStatus: "ok",
		Refresh:      Duration(90 * time.Second),
		Services:     map[string]string{"exa": "exaai"},
	}
	check := func(t *testing.T, got Config) {
		t.Helper()
		if got.Table != want.Table || got.Columns != want.Columns || got.ActiveStatus != want.ActiveStatus ||
			got.Refresh != want.Refresh || !mapsEqual(got.Services, want.Services) {
			t.Fatalf("got %+v, want %+v", got, want)
		}
	}
	for _, refresh := range []string{`"1m30s"`, `90`, `"90"`} {
		t.Run("json refresh "+refresh, func(t *testing.T) {
			var got Config
			doc := `{"table":"creds","columns":{"api_key":"key_value"},"active_status":"ok","refresh":` + refresh + `,"services":{"exa":"exaai"}}`
			if err := json.Unmarshal([]byte(doc), &got); err != nil {
				t.Fatal(err)
			}
			check(t, got)
		})
	}
	for _, refresh := range []string{"1m30s", "90", `"90s"`} {
		t.Run("yaml refresh "+refresh, func(t *testing.T) {
			var got struct {
				External Config `yaml:"external"`
			}
			doc := "external:\n  table: creds\n  columns: {api_key: key_value}\n  active_status: ok\n  refresh: " + refresh + "\n  services: {exa: exaai}\n"
			if err := yaml.Unmarshal([]byte(doc), &got); err != nil {
				t.Fatal(err)
			}
			check(t, got.External)
		})
	}
	t.Run("json round trip", func(t *testing.T) {
		b, err := json.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), `"refresh":"1m30s"`) {
			t.Errorf("encoded %s", b)
		}
		var got Config
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		check(t, got)
	})
	t.Run("bad duration", func(t *testing.T) {
		var got Config
		if err := json.Unmarshal([]byte(`{"refresh":"soon"}`), &got); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("err = %v", err)
		}
	})
}

func TestOpenDSN(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.db")
	tests := []struct {
		name string
		dsn  string
		is   error
	}{
		{"mysql", "mysql://u:p@h/db", ErrUnsupportedDSN},
		{"empty", "", ErrUnsupportedDSN},
		{"memory", "sqlite::memory:", ErrUnsupportedDSN},
		{"missing file is not created", "sqlite:" + missing, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(context.Background(), tt.dsn, Config{})
			if err == nil {
				_ = s.Close()
				t.Fatal("Open succeeded")
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("err = %v, want %v", err, tt.is)
			}
			if strings.Contains(err.Error(), "u:p") {
				t.Errorf("error leaks the dsn: %v", err)
			}
		})
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("Open created %s (stat err %v)", missing, err)
	}
}

// TestSQLiteReadOnly proves the Source never writes: the database file sits
// in a read-only directory with mode 0444, it still serves keys, every write
// through its own connection pool fails, and the file and directory are
// byte-for-byte unchanged afterwards.
func TestSQLiteReadOnly(t *testing.T) {
	path, w := newSQLite(t, fixture)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	if err := os.Chmod(path, 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(dir, 0o755); _ = os.Chmod(path, 0o644) })
	before := snapshotDir(t, dir)

	s := open(t, "sqlite:"+path, Config{Services: map[string]string{"exa": "exaai"}})
	ctx := context.Background()
	keys, err := s.Keys(ctx, "exa")
	if err != nil || len(keys) != 2 {
		t.Fatalf("Keys = %v, %v", ids(keys), err)
	}
	if _, err := s.Keys(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Version(ctx); err != nil {
		t.Fatal(err)
	}
	// Even where the OS would allow it (tests running as root ignore file
	// modes), the connection itself refuses to write.
	for _, q := range []string{
		`UPDATE credentials SET status = 'hacked'`,
		`INSERT INTO credentials (service, api_key) VALUES ('x', 'y')`,
		`CREATE TABLE t (x INTEGER)`,
		`DELETE FROM credentials`,
	} {
		if _, err := s.db.ExecContext(ctx, q); err == nil {
			t.Errorf("write succeeded through the Source's pool: %s", q)
		}
	}
	var qo int
	if err := s.db.QueryRowContext(ctx, `PRAGMA query_only`).Scan(&qo); err != nil || qo != 1 {
		t.Errorf("PRAGMA query_only = %d, %v; want 1", qo, err)
	}
	_ = s.Close()
	if after := snapshotDir(t, dir); after != before {
		t.Errorf("directory changed:\nbefore %s\nafter  %s", before, after)
	}
}

// snapshotDir returns the names, modes and content hashes of dir's files.
func snapshotDir(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		info, _ := e.Info()
		fmt.Fprintf(&b, "%s %v %x; ", e.Name(), info.Mode(), sha256.Sum256(data))
	}
	return b.String()
}

// TestRefreshAfterTTL uses expirable's own TTL: once it passes, rows that
// turned inactive are gone and new active rows appear.
func TestRefreshAfterTTL(t *testing.T) {
	path, w := newSQLite(t, fixture)
	const ttl = 150 * time.Millisecond
	s := open(t, "sqlite:"+path, Config{Refresh: Duration(ttl), Services: map[string]string{"exa": "exaai"}})
	ctx := context.Background()
	if keys, err := s.Keys(ctx, "exa"); err != nil || !slices.Equal(ids(keys), []string{"exa/ext_1", "exa/ext_2"}) {
		t.Fatalf("Keys = %v, %v", ids(keys), err)
	}
	// The owner suspends key 1 and registers key 7, without touching
	// updated_at: only the TTL can reveal it.
	if _, err := w.Exec(`UPDATE credentials SET status = 'suspended' WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	insertRow(t, w, row{7, "exaai", "exa-new-key-00000000000007", "", 1, 0, "requests", "active", ""})

	want := []string{"exa/ext_2", "exa/ext_7"}
	deadline := time.Now().Add(5 * time.Second)
	for {
		keys, err := s.Keys(ctx, "exa")
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(ids(keys), want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after TTL keys = %v, want %v", ids(keys), want)
		}
		time.Sleep(ttl / 5)
	}
}

// TestCacheBoundedByRefresh uses the injectable clock: rows are served from
// memory while younger than Refresh and read again once older, and a
// Version change drops them at once.
func TestCacheBoundedByRefresh(t *testing.T) {
	path, w := newSQLite(t, fixture)
	s := open(t, "sqlite:"+path, Config{Refresh: Duration(time.Hour), Services: map[string]string{"exa": "exaai"}})
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	ctx := context.Background()
	get := func() []string {
		t.Helper()
		keys, err := s.Keys(ctx, "exa")
		if err != nil {
			t.Fatal(err)
		}
		return ids(keys)
	}
	v1, err := s.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	get()

	// A change that leaves count, max(id) and updated_at alone (a status
	// flip still changes the active count, so change the secret instead).
	if _, err := w.Exec(`UPDATE credentials SET api_key = 'exa-rotated-key-000000000001' WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	keys, _ := s.Keys(ctx, "exa")
	if keys[0].Secret.Reveal() != keyExa1 {
		t.Fatal("cache not used within Refresh")
	}
	if v, _ := s.Version(ctx); v != v1 {
		t.Fatal("version changed without a visible change in the same refresh period")
	}
	advance(time.Hour + time.Second)
	keys, _ = s.Keys(ctx, "exa")
	if keys[0].Secret.Reveal() != "exa-rotated-key-000000000001" {
		t.Fatal("cache served rows older than Refresh")
	}
	if v, _ := s.Version(ctx); v == v1 {
		t.Fatal("version did not change when the refresh period rolled over")
	}

	// A status flip changes Version at once and purges the cache.
	v2, _ := s.Version(ctx)
	if _, err := w.Exec(`UPDATE credentials SET status = 'expired' WHERE id = 2`); err != nil {
		t.Fatal(err)
	}
	if got := get(); !slices.Equal(got, []string{"exa/ext_1", "exa/ext_2"}) {
		t.Fatalf("expected cached rows before Version, got %v", got)
	}
	v3, err := s.Version(ctx)
	if err != nil || v3 == v2 {
		t.Fatalf("Version did not change: %q %q %v", v2, v3, err)
	}
	if got := get(); !slices.Equal(got, []string{"exa/ext_1"}) {
		t.Fatalf("after Version change keys = %v", got)
	}
	// A new row changes it too.
	insertRow(t, w, row{9, "exaai", "exa-new-key-00000000000009", "", 1, 0, "requests", "active", ""})
	if v4, _ := s.Version(ctx); v4 == v3 {
		t.Fatal("Version did not change on insert")
	}
	if got := get(); !slices.Equal(got, []string{"exa/ext_1", "exa/ext_9"}) {
		t.Fatalf("after insert keys = %v", got)
	}
}

func TestErrorsCarryNoSecret(t *testing.T) {
	ctx := context.Background()
	// Row 8's quota holds a key-like string: the read fails mid-way, after
	// rows 1 and 2 were read.
	rows := append(slices.Clone(fixture), row{8, "exaai", keyFire, "", "fc-quota-secret-000000000008", 0, "requests", "active", ""})
	path, _ := newSQLite(t, rows)
	secrets := append(slices.Clone(allSecrets), "fc-quota-secret-000000000008")

	checkErr := func(t *testing.T, err error) {
		t.Helper()
		if err == nil {
			t.Fatal("no error")
		}
		for _, sec := range secrets {
			if strings.Contains(err.Error(), sec) || strings.Contains(fmt.Sprintf("%+v", err), sec) {
				t.Fatalf("error leaks a secret: %v", err)
			}
		}
		t.Logf("error: %v", err)
	}

	t.Run("bad value mid-way", func(t *testing.T) {
		s := open(t, "sqlite:"+path, Config{Services: map[string]string{"exa": "exaai"}})
		_, err := s.Keys(ctx, "exa")
		checkErr(t, err)
		_, err = s.Keys(ctx, "")
		checkErr(t, err)
		// Other services are unaffected.
		if keys, err := s.Keys(ctx, "groq"); err != nil || len(keys) != 1 {
			t.Errorf("groq: %v, %v", ids(keys), err)
		}
	})
	t.Run("api_key mapped to a numeric field", func(t *testing.T) {
		s := open(t, "sqlite:"+path, Config{Columns: Columns{QuotaUsed: "api_key"}})
		_, err := s.Keys(ctx, "groq")
		checkErr(t, err)
	})
	t.Run("missing column fails Open", func(t *testing.T) {
		_, err := Open(ctx, "sqlite:"+path, Config{Columns: Columns{Email: "no_such_column"}})
		checkErr(t, err)
	})
	t.Run("closed database", func(t *testing.T) {
		s := open(t, "sqlite:"+path, Config{})
		_ = s.Close()
		_, err := s.Keys(ctx, "groq")
		checkErr(t, err)
		_, err = s.Version(ctx)
		checkErr(t, err)
	})
	t.Run("canceled context wraps context.Canceled", func(t *testing.T) {
		s := open(t, "sqlite:"+path, Config{})
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err := s.Keys(cctx, "groq")
		checkErr(t, err)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
	})
	t.Run("driver text quoting a secret is redacted", func(t *testing.T) {
		inner := fmt.Errorf("driver: bad value %q: %w", keyExa1, context.DeadlineExceeded)
		err := redact(inner, []string{keyExa1})
		checkErr(t, err)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Error("redacted error lost errors.Is")
		}
	})
}

func TestConcurrentKeys(t *testing.T) {
	path, w := newSQLite(t, fixture)
	s := open(t, "sqlite:"+path, Config{Refresh: Duration(20 * time.Millisecond), Services: map[string]string{"exa": "exaai"}})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 16 {
		wg.Go(func() {
			for j := range 50 {
				svc := []string{"exa", "groq", "", "tavily"}[(i+j)%4]
				keys, err := s.Keys(ctx, svc)
				if err != nil {
					errs <- err
					return
				}
				if svc == "exa" && len(keys) == 0 {
					errs <- errors.New("no exa keys")
					return
				}
				if j%10 == 0 {
					if _, err := s.Version(ctx); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	for i := range 20 {
		insertRow(t, w, row{100 + i, "groq", fmt.Sprintf("gsk_more_%020d", i), "", 1, 0, "requests", "active", ""})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
