package server_test

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

// TestConfigFileAndAdminAPIRefuseTheSameServices pins the one set of
// service and key rules: what POST /admin/services or /admin/keys refuses
// (400 bad_request), the configuration file refuses too, with the same
// message.
func TestConfigFileAndAdminAPIRefuseTheSameServices(t *testing.T) {
	k := startKP(t)
	for _, tc := range []struct {
		name string
		// yaml is the service's fields in the file (indented under "- ");
		// body is the same service for POST /admin/services.
		yaml string
		body string
		want string
	}{
		{"name not URL-safe", "name: OpenAI\n    base_url: https://api.openai.com",
			`{"name":"OpenAI","base_url":"https://api.openai.com"}`, `name \"OpenAI\" is invalid`},
		{"metadata upstream", "name: md\n    base_url: http://169.254.169.254",
			`{"name":"md","base_url":"http://169.254.169.254"}`, "link-local or metadata address"},
		{"base_url with a query", "name: q\n    base_url: https://api.example.com/?key=1",
			`{"name":"q","base_url":"https://api.example.com/?key=1"}`, "base_url must not have a query"},
		{"negative rate_limit_rpm", "name: n\n    base_url: https://api.example.com\n    rate_limit_rpm: -1",
			`{"name":"n","base_url":"https://api.example.com","rate_limit_rpm":-1}`, "rate_limit_rpm must not be negative"},
		{"hop-by-hop proxy header", "name: h\n    base_url: https://api.example.com\n    proxy_headers: {Connection: close}",
			`{"name":"h","base_url":"https://api.example.com","proxy_headers":{"Connection":"close"}}`, "Connection is a hop-by-hop"},
		{"header name over 256 bytes", "name: h2\n    base_url: https://api.example.com\n    auth_scheme: header:" + strings.Repeat("x", 257),
			`{"name":"h2","base_url":"https://api.example.com","auth_scheme":"header:` + strings.Repeat("x", 257) + `"}`, "unknown auth_scheme"},
		{"unknown selector", "name: s\n    base_url: https://api.example.com\n    selector: fastest",
			`{"name":"s","base_url":"https://api.example.com","selector":"fastest"}`, `selector: unknown selector \"fastest\"`},
		{"unknown classifier", "name: c\n    base_url: https://api.example.com\n    classifier: strict",
			`{"name":"c","base_url":"https://api.example.com","classifier":"strict"}`, `classifier: unknown classifier \"strict\"`},
		{"timeout over a day", "name: t\n    base_url: https://api.example.com\n    header_timeout: 25h",
			`{"name":"t","base_url":"https://api.example.com","header_timeout":"25h"}`, "header_timeout must be at most 24h0m0s"},
		{"unknown llm_family", "name: f\n    base_url: https://api.example.com\n    llm_family: cohere",
			`{"name":"f","base_url":"https://api.example.com","llm_family":"cohere"}`, `llm_family \"cohere\": want openai`},
		{"empty allow-listed model", "name: m\n    base_url: https://api.example.com\n    models_enabled: [' ']",
			`{"name":"m","base_url":"https://api.example.com","models_enabled":[" "]}`, "models_enabled[0] is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, m, _ := k.do("POST", "/admin/services", k.admin, tc.body)
			msg := fmt.Sprint(m["error"])
			if code != 400 || !strings.Contains(fmt.Sprintf("%q", msg), tc.want) {
				t.Errorf("admin API: %d %v, want 400 with %s", code, m, tc.want)
			}
			cfg, err := server.ParseConfig([]byte("services:\n  - "+tc.yaml+"\n"), func(string) (string, bool) { return "", false })
			if err != nil {
				t.Fatal(err)
			}
			err = cfg.Validate()
			if err == nil || !strings.Contains(fmt.Sprintf("%q", err.Error()), tc.want) {
				t.Errorf("config file: %v, want an error with %s", err, tc.want)
			}
		})
	}

	// Keys: a value the admin API refuses is refused in the file too.
	if code, m, _ := k.do("POST", "/admin/services", k.admin, `{"name":"ok","base_url":"https://api.example.com"}`); code != 201 {
		t.Fatalf("create service: %d %v", code, m)
	}
	const want = "key_value must not contain spaces or control characters"
	if code, m, _ := k.do("POST", "/admin/keys", k.admin, `{"service":"ok","key_value":"sk one"}`); code != 400 || !strings.Contains(fmt.Sprint(m), want) {
		t.Errorf("admin API key: %d %v, want 400 with %q", code, m, want)
	}
	cfg, err := server.ParseConfig([]byte("services:\n  - name: ok\n    base_url: https://api.example.com\n    keys: [{key_value: sk one}]\n"),
		func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("config file key: %v, want %q", err, want)
	}
}

// TestRegisteredClassifierAndStoreServeTheProxy runs keypoold with a
// store opened by the caller (Config.Store) and a classifier registered
// by name: a service that names it has its answers judged by it (a 418
// taken as rate-limited fails over to the next key), while a service
// without it keeps the built-in rules (418 goes back to the client).
func TestRegisteredClassifierAndStoreServeTheProxy(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bearerKey(r.Header) == "sk-teapot" {
			w.WriteHeader(http.StatusTeapot)
			return
		}
		okJSON(w, r)
	})
	teapotCools := func(resp *http.Response, err error) keypool.Outcome {
		if err == nil && resp.StatusCode == http.StatusTeapot {
			return keypool.Outcome{Kind: keypool.RateLimited, RetryAfter: time.Minute, Reason: "teapot"}
		}
		return keypool.Classify(resp, err, time.Now())
	}
	ring, err := seal.ParseKeyring(testEncKey)
	if err != nil {
		t.Fatal(err)
	}
	st, err := sqlstore.Open(context.Background(), "sqlite:"+filepath.Join(t.TempDir(), "own.db"), sqlstore.Options{Keyring: ring})
	if err != nil {
		t.Fatal(err)
	}
	k := startKP(t, func(c *server.Config) {
		c.Store = st
		c.Classifiers = map[string]keypool.Classifier{"teapot_cools": teapotCools}
	})
	if k.srv.Store() != st {
		t.Fatalf("server store = %v, want the one given", k.srv.Store())
	}
	for _, svc := range []struct {
		name  string
		extra map[string]any
	}{{"judged", map[string]any{"classifier": "teapot_cools", "selector": "ordered"}}, {"plain", map[string]any{"selector": "ordered"}}} {
		k.addService(svc.name, up.URL, "bearer", svc.extra)
		k.addKey(svc.name, "sk-teapot", map[string]any{"priority": 0})
		k.addKey(svc.name, "sk-good", map[string]any{"priority": 1})
	}
	// The store given is the one written to.
	if s, err := st.GetService(context.Background(), "judged"); err != nil || s.Classifier != "teapot_cools" {
		t.Fatalf("stored service: %+v, %v", s, err)
	}
	tok := k.addToken(k.addTeam("eng", nil), nil)
	if code, m, _ := k.do("POST", "/v1/judged/v1/chat/completions", tok, `{"model":"gpt-4o-mini"}`); code != 200 {
		t.Errorf("judged service: %d %v, want 200 after failing over from the teapot key", code, m)
	}
	if got := up.last(); bearerKey(got.Header) != "sk-good" {
		t.Errorf("judged service served by %q", bearerKey(got.Header))
	}
	if code, _, _ := k.do("POST", "/v1/plain/v1/chat/completions", tok, `{"model":"gpt-4o-mini"}`); code != http.StatusTeapot {
		t.Errorf("plain service: %d, want the upstream's 418", code)
	}
}
