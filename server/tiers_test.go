package server_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
)

// TestTierAdminValidation: bad tier bodies are 400 with the JSON error
// shape, a second tier of a name is 409, an unknown tier 404, and nothing
// is half-written.
func TestTierAdminValidation(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	k.mustAdmin("POST", "/admin/tiers", map[string]any{"name": "pro", "features": map[string]int{"image-generation": 100}}, http.StatusCreated)
	tests := []struct {
		name   string
		method string
		path   string
		body   any
		want   int
	}{
		{"no name", "POST", "/admin/tiers", map[string]any{"features": map[string]int{"a": 1}}, 400},
		{"bad name", "POST", "/admin/tiers", map[string]any{"name": "a b", "features": map[string]int{"a": 1}}, 400},
		{"no features", "POST", "/admin/tiers", map[string]any{"name": "free"}, 400},
		{"empty features", "POST", "/admin/tiers", map[string]any{"name": "free", "features": map[string]int{}}, 400},
		{"negative rpm", "POST", "/admin/tiers", map[string]any{"name": "free", "features": map[string]int{"a": -1}}, 400},
		{"blank feature", "POST", "/admin/tiers", map[string]any{"name": "free", "features": map[string]int{" ": 1}}, 400},
		{"rpm not a number", "POST", "/admin/tiers", `{"name":"free","features":{"a":"ten"}}`, 400},
		{"unknown field", "POST", "/admin/tiers", map[string]any{"name": "free", "features": map[string]int{"a": 1}, "rpm": 3}, 400},
		{"duplicate", "POST", "/admin/tiers", map[string]any{"name": "pro", "features": map[string]int{"a": 1}}, 409},
		{"get unknown", "GET", "/admin/tiers/gold", nil, 404},
		{"patch unknown", "PATCH", "/admin/tiers/gold", map[string]any{"features": map[string]int{"a": 1}}, 404},
		{"patch rename", "PATCH", "/admin/tiers/pro", map[string]any{"name": "gold"}, 400},
		{"patch null features", "PATCH", "/admin/tiers/pro", `{"features":null}`, 400},
		{"delete unknown", "DELETE", "/admin/tiers/gold", nil, 404},
		{"key in unknown tier", "POST", "/admin/keys", map[string]any{"name": "k", "key": "sk-unknown-tier-0123456789", "tier": "gold"}, 400},
		{"import into unknown tier", "POST", "/admin/keys/import", []map[string]any{
			{"service": "openai", "key_value": "sk-import-tier-0123456789", "tier": "pro"},
			{"service": "openai", "key_value": "sk-import-gold-0123456789", "tier": "gold"},
		}, 400},
		{"method", "PUT", "/admin/tiers/pro", map[string]any{}, 405},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, m, _ := k.do(tt.method, tt.path, k.admin, tt.body)
			if code != tt.want {
				t.Fatalf("%s %s = %d %v, want %d", tt.method, tt.path, code, m, tt.want)
			}
			if e, ok := m["error"].(map[string]any); !ok || e["message"] == "" || e["type"] == nil || e["code"] == nil {
				t.Fatalf("error body %v lacks the JSON error shape", m)
			}
		})
	}
	list := k.mustAdmin("GET", "/admin/tiers", nil, http.StatusOK)["tiers"].([]any)
	if len(list) != 1 || list[0].(map[string]any)["name"] != "pro" {
		t.Fatalf("GET /admin/tiers = %v, want pro alone", list)
	}
	if keys := k.mustAdmin("GET", "/admin/keys", nil, http.StatusOK)["keys"].([]any); len(keys) != 0 {
		t.Fatalf("rejected key writes left keys: %v", keys)
	}
	feats := list[0].(map[string]any)["features"].(map[string]any)
	if len(feats) != 1 || feats["image-generation"] != float64(100) {
		t.Fatalf("pro features = %v, want image-generation 100 (a rejected PATCH changed nothing)", feats)
	}
}

// TestTiersKeypooler runs keypooler's calls as written: a tier, a key
// named and given by "key" joining it without a service (the only one),
// then GET /key?feature=… admitting exactly the tier's rpm in the minute;
// GET /admin/keys shows the tier and the feature's use; raising the
// tier's rpm reaches the pool; a tier with keys cannot be deleted.
func TestTiersKeypooler(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	k.mustAdmin("POST", "/admin/tiers", map[string]any{"name": "pro", "features": map[string]int{"image-generation": 3}}, http.StatusCreated)
	m := k.mustAdmin("POST", "/admin/keys", map[string]any{"name": "openai-1", "key": "sk-abc123-0123456789abcdef", "tier": "pro"}, http.StatusCreated)
	k.secrets = append(k.secrets, "sk-abc123-0123456789abcdef")
	id, _ := m["id"].(string)
	if m["tier"] != "pro" || m["service"] != "openai" {
		t.Fatalf("POST /admin/keys = %v, want tier pro in service openai", m)
	}
	tok := k.addToken(k.addTeam("eng", nil), map[string]any{"scopes": []string{"lease"}})

	// rpm 3: three leases in the minute, the fourth refused (the bucket
	// refills one lease per 20 s; the calls take well under that).
	for i := range 4 {
		code, m, _ := k.do("GET", "/key?feature=image-generation", tok, nil)
		want := http.StatusOK
		if i == 3 {
			want = http.StatusTooManyRequests
		}
		if code != want {
			t.Fatalf("lease %d: %d %v, want %d", i+1, code, m, want)
		}
		if code == 200 && m["key_id"] != id {
			t.Fatalf("lease %d: key %v, want %s", i+1, m["key_id"], id)
		}
	}
	keys := k.mustAdmin("GET", "/admin/keys", nil, http.StatusOK)["keys"].([]any)
	kv := keys[0].(map[string]any)
	use, _ := kv["features"].(map[string]any)["image-generation"].(map[string]any)
	if kv["tier"] != "pro" || use["rpm"] != float64(3) || use["used"] != float64(3) || use["available"] != float64(0) {
		t.Fatalf("GET /admin/keys: tier %v features %v, want pro with image-generation rpm 3 used 3 available 0", kv["tier"], kv["features"])
	}

	k.mustAdmin("PATCH", "/admin/tiers/pro", map[string]any{"features": map[string]int{"image-generation": 10}}, http.StatusOK)
	eventually(t, "the raised tier rpm reaches the pool", func() bool {
		code, _, _ := k.do("GET", "/key?feature=image-generation", tok, nil)
		return code == http.StatusOK
	})

	k.mustAdmin("DELETE", "/admin/tiers/pro", nil, http.StatusConflict)
	k.mustAdmin("PATCH", "/admin/keys/"+id, map[string]any{"tier": ""}, http.StatusOK)
	k.mustAdmin("DELETE", "/admin/tiers/pro", nil, http.StatusNoContent)
	k.checkLogs()
}

// TestTiersInConfigFile: a tiers: section creates the tiers at start, a
// key of the file joins one, and GET /admin/tiers and /admin/keys show
// them; bad tiers stop the configuration with the field named.
func TestTiersInConfigFile(t *testing.T) {
	doc := `
tiers:
  - name: pro
    description: paid plan
    features: {image-generation: 100, chat: 0}
services:
  - name: openai
    base_url: https://api.openai.com
    keys:
      - {key_value: sk-file-0123456789abcdef, tier: pro}
`
	cfg, err := server.ParseConfig([]byte(doc), func(string) (string, bool) { return "", false })
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		t.Fatal(err)
	}
	k := startKP(t, func(c *server.Config) { c.Tiers, c.Services = cfg.Tiers, cfg.Services })
	k.secrets = append(k.secrets, "sk-file-0123456789abcdef")
	tier := k.mustAdmin("GET", "/admin/tiers/pro", nil, http.StatusOK)
	if tier["description"] != "paid plan" || tier["features"].(map[string]any)["image-generation"] != float64(100) {
		t.Fatalf("GET /admin/tiers/pro = %v", tier)
	}
	keys := k.mustAdmin("GET", "/admin/keys", nil, http.StatusOK)["keys"].([]any)
	if len(keys) != 1 || keys[0].(map[string]any)["tier"] != "pro" {
		t.Fatalf("GET /admin/keys = %v, want one key in tier pro", keys)
	}

	for _, tc := range []struct{ name, doc, want string }{
		{"no features", "tiers: [{name: pro}]", "features must name at least one feature"},
		{"negative rpm", "tiers: [{name: pro, features: {a: -1}}]", `features["a"] must be 0 to 1000000`},
		{"twice", "tiers: [{name: pro, features: {a: 1}}, {name: pro, features: {a: 2}}]", `tier "pro" declared twice`},
		{"unknown field", "tiers: [{name: pro, features: {a: 1}, rpm: 3}]", "rpm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := server.ParseConfig([]byte(tc.doc), func(string) (string, bool) { return "", false })
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestTierRPMConcurrent: 200 parallel leases for a feature whose tier
// allows 50 a minute on the one key: exactly 50 are granted, the others
// are 429. Bound: granted is 50 plus the bucket's refill during the run
// (50/60 a second, +1 for rounding); exactly 50 when the run takes under
// 1.2 s.
func TestTierRPMConcurrent(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	k.mustAdmin("POST", "/admin/tiers", map[string]any{"name": "pro", "features": map[string]int{"image-generation": 50}}, http.StatusCreated)
	k.addKey("openai", "sk-conc-0123456789abcdef", map[string]any{"tier": "pro"})
	tok := k.addToken(k.addTeam("eng", nil), map[string]any{"scopes": []string{"lease"}})
	const n = 200
	codes := make(chan int, n)
	var wg sync.WaitGroup
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, _ := k.do("GET", "/key?feature=image-generation", tok, nil)
			codes <- code
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(codes)
	got := map[int]int{}
	for c := range codes {
		got[c]++
	}
	if elapsed < 1200*time.Millisecond && (got[200] != 50 || got[429] != n-50) {
		t.Fatalf("%d parallel leases in %v: %v, want 50 granted and %d refused", n, elapsed, got, n-50)
	}
	t.Logf("%d parallel leases in %v: %v", n, elapsed, got)
	if got[200] < 50 || got[200] > 50+int(elapsed.Seconds()*50/60)+1 || got[200]+got[429] != n {
		t.Fatalf("%d parallel leases in %v: %d granted, want 50 plus the refill", n, elapsed, got[200])
	}
}
