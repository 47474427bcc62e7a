package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

func TestWebSocketClosedOnShutdown(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		_ = brw.Flush()
		_, _ = io.Copy(c, brw) // echo until closed
	})
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA)

	conn, err := net.Dial("tcp", strings.TrimPrefix(k.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /v1/openai/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: token, %s\r\n\r\n", tok)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 {
		t.Fatalf("upgrade: %d", resp.StatusCode)
	}
	if got := up.last().Header.Get("Authorization"); got != "Bearer "+keyA {
		t.Errorf("upstream upgrade carried Authorization %q", got)
	}
	if strings.Contains(up.last().Header.Get("Sec-Websocket-Protocol"), tok) {
		t.Error("the token reached the upstream in Sec-WebSocket-Protocol")
	}
	_, _ = io.WriteString(conn, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	start := time.Now()
	if err := k.stop(); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err == nil {
		t.Error("the WebSocket is still open after shutdown")
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("shutdown with an open WebSocket took %v; it should not wait for it", d)
	}
}

func TestZeroConfigSecrets(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	out := &syncBuffer{}
	logs := &syncBuffer{}
	start := func() *server.Server {
		s, err := server.New(context.Background(), server.Config{Output: out, LogOutput: logs})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := start()
	tok := s.AdminToken().Reveal()
	if tok == "" || !strings.Contains(out.String(), tok) {
		t.Fatalf("generated admin token not announced: %q", out.String())
	}
	if !strings.Contains(out.String(), "WARNING") || !strings.Contains(out.String(), server.EncryptionKeyFile) {
		t.Errorf("no warning about the generated encryption key: %q", out.String())
	}
	if strings.Contains(logs.String(), tok) {
		t.Error("the admin token reached the logs")
	}
	for _, f := range []string{"data/keypool.db", "data/" + server.AdminTokenFile, "data/" + server.EncryptionKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if strings.HasPrefix(f, "data/"+server.AdminTokenFile) || strings.HasPrefix(f, "data/"+server.EncryptionKeyFile) {
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s mode %v, want 0600", f, fi.Mode().Perm())
			}
		}
	}
	// Add a key so that the second start must open it with the same
	// encryption key.
	st := s.Store()
	if err := st.CreateService(context.Background(), &store.Service{Name: "exa", BaseURL: "https://api.exa.ai", AuthScheme: "x-api-key"}); err != nil {
		t.Fatal(err)
	}
	if err := st.CreateKeys(context.Background(), []*store.Key{{Service: "exa", Secret: "exa-secret-123456789", Status: "active"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	before := len(out.String())
	s2 := start()
	defer s2.Shutdown(context.Background())
	if s2.AdminToken().Reveal() != tok {
		t.Error("the admin token changed across restarts")
	}
	if strings.Contains(out.String()[before:], tok) {
		t.Error("the admin token was printed again on restart")
	}
	if got := len(s2.Pool().Services()); got != 1 {
		t.Errorf("restart loaded %d services", got)
	}
	// The admin API answers to the persisted token.
	srv := httpServe(t, s2)
	req, _ := http.NewRequest("GET", srv+"/admin/services", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("admin with the persisted token: %d", resp.StatusCode)
	}
}

// httpServe serves s on a loopback port until the test ends.
func httpServe(t *testing.T, s *server.Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = s.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return "http://" + ln.Addr().String()
}

func TestParseConfig(t *testing.T) {
	// The key is full of YAML syntax (but, like every key value the admin
	// API accepts, has no spaces): substitution after parsing keeps it a
	// plain string.
	env := map[string]string{"OPENAI_KEY_1": "[sk-from-env-1]:{not#yaml", "PORT_RPM": "90", "EXA": "exa-key"}
	lookup := func(n string) (string, bool) { v, ok := env[n]; return v, ok }
	doc := `
listen: 127.0.0.1:9999
log_format: text
drain_timeout: 10s
services:
  - name: openai
    base_url: https://api.openai.com
    auth_scheme: bearer
    rate_limit_rpm: ${PORT_RPM}
    proxy_headers: {OpenAI-Beta: "assistants=v2"}
    retry_after_cap: 1800
    confirm_refusals: 4
    min_active_keys: 1
    max_ejection_percent: 30
    keys:
      - key_value: ${OPENAI_KEY_1}
        labels: {tier: pro}
      - key_value: "literal-$${NOT_EXPANDED}"
  - name: exa
    base_url: https://api.exa.ai
    auth_scheme: x-api-key
    external_name: exaai
    keys: [{key_value: "${EXA}"}]
external:
  table: creds
  refresh: 45s
  columns: {api_key: secret}
  services: {exa: exaai}
`
	cfg, err := server.ParseConfig([]byte(doc), lookup)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:9999" || cfg.LogFormat != "text" || time.Duration(cfg.DrainTimeout) != 10*time.Second {
		t.Errorf("settings: %+v", cfg)
	}
	if len(cfg.Services) != 2 || cfg.Services[0].RateLimitRPM != 90 || cfg.Services[0].ProxyHeaders["OpenAI-Beta"] != "assistants=v2" {
		t.Fatalf("services: %+v", cfg.Services)
	}
	if s := cfg.Services[0]; s.RetryAfterCap != 1800 || s.ConfirmRefusals != 4 || s.MinActiveKeys != 1 || s.MaxEjectionPercent != 30 {
		t.Errorf("key policy: %+v", s)
	}
	if got := cfg.Services[0].Keys[0].KeyValue.Reveal(); got != env["OPENAI_KEY_1"] {
		t.Errorf("key 1 = %q", got)
	}
	if got := cfg.Services[0].Keys[1].KeyValue.Reveal(); got != "literal-${NOT_EXPANDED}" {
		t.Errorf("escaped key = %q", got)
	}
	if cfg.External.Table != "creds" || time.Duration(cfg.External.Refresh) != 45*time.Second || cfg.External.Columns.APIKey != "secret" {
		t.Errorf("external: %+v", cfg.External)
	}
	if err := cfg.Validate(); err != nil {
		t.Error(err)
	}
	// Printing the config shows no secret.
	j, _ := json.Marshal(cfg)
	for _, text := range []string{fmt.Sprintf("%v %+v %#v", cfg, cfg, cfg), string(j)} {
		if strings.Contains(text, "sk-from-env") || strings.Contains(text, "exa-key") {
			t.Errorf("config printed a secret: %s", text)
		}
	}

	for _, tc := range []struct{ name, doc, want string }{
		{"unset variable", "services: [{name: a, base_url: 'http://x', keys: [{key_value: '${NOPE}'}]}]", "NOPE is not set"},
		{"unknown field", "listen: x\nlisten_addr: y\n", "listen_addr"},
		{"bad scheme", "services: [{name: a, base_url: 'http://x', auth_scheme: weird}]", "auth_scheme"},
		{"bad url", "services: [{name: a, base_url: 'ftp://x'}]", "base_url"},
		{"local port without scheme", "services: [{name: a, base_url: 'localhost:22001'}]", `did you mean "http://localhost:22001"?`},
		{"host without scheme", "services: [{name: a, base_url: 'api.openai.com'}]", `did you mean "https://api.openai.com"?`},
		{"metadata address", "services: [{name: a, base_url: 'http://169.254.169.254'}]", "metadata"},
		{"empty key", "services: [{name: a, base_url: 'http://x', keys: [{key_value: ''}]}]", "key_value is empty"},
		{"ejection over 100", "services: [{name: a, base_url: 'http://x', max_ejection_percent: 101}]", "max_ejection_percent must be 0 to 100"},
		{"negative floor", "services: [{name: a, base_url: 'http://x', min_active_keys: -1}]", "min_active_keys"},
		{"unknown policy field", "services: [{name: a, base_url: 'http://x', retry_after_caps: 5}]", "retry_after_caps"},
		{"router bad glob", "services: [{name: r, kind: router, routes: [{model: 'gpt-[4', targets: [{service: a}]}]}]", "not a valid glob"},
		{"router empty targets", "services: [{name: r, kind: router, routes: [{model: m, targets: []}]}]", "targets must not be empty"},
		{"router base_url", "services: [{name: r, kind: router, base_url: 'http://x', routes: [{model: m, targets: [{service: a}]}]}]", "no base_url"},
		{"router settings", "services: [{name: r, kind: router, router: {max_attempts: 0, breaker_failures: 2000}, routes: [{model: m, targets: [{service: a}]}]}]", "router.breaker_failures must be between 1 and 1000"},
		{"router settings typo", "services: [{name: r, kind: router, router: {max_atempts: 2}, routes: [{model: m, targets: [{service: a}]}]}]", "max_atempts"},
		{"routes without router", "services: [{name: a, base_url: 'http://x', routes: [{model: m, targets: [{service: b}]}]}]", `kind "router"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := server.ParseConfig([]byte(tc.doc), lookup)
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestSecretURLRedacts(t *testing.T) {
	for _, tc := range []struct{ in, hidden string }{
		{"postgres://keypool:hunter2@db:5432/keypool?sslmode=disable", "hunter2"},
		{"redis://:s3cret@127.0.0.1:6379/0", "s3cret"},
		{"redis://s3cret@127.0.0.1:6379/0", "s3cret"},
		{"host=db user=k password=hunter2", "hunter2"},
		{"postgres://db/k?password=hunter2", "hunter2"},
	} {
		u := server.SecretURL(tc.in)
		j, _ := json.Marshal(u)
		for _, s := range []string{u.String(), fmt.Sprintf("%v %s %+v %#v", u, u, u, u), string(j)} {
			if strings.Contains(s, tc.hidden) {
				t.Errorf("%q printed as %q", tc.in, s)
			}
		}
		if u.Reveal() != tc.in {
			t.Errorf("Reveal lost the value")
		}
	}
}

func TestDeclaredServicesApplied(t *testing.T) {
	up := newUpstream(t, okJSON)
	spec := server.ServiceSpec{Name: "groq", BaseURL: up.URL, AuthScheme: "bearer", RetryAfterCap: 120, MaxEjectionPercent: 20,
		HeaderTimeout: server.Duration(250 * time.Millisecond), RequestTimeout: server.Duration(time.Hour),
		Keys: []server.KeySpec{{KeyValue: keyA}, {KeyValue: keyB, Weight: 2}}}
	var dbPath string
	k := startKP(t, func(c *server.Config) { c.Services = []server.ServiceSpec{spec}; dbPath = c.Database.Reveal() })
	if got, _ := k.srv.Pool().Stats("groq"); len(got) != 2 {
		t.Fatalf("declared keys in the pool: %d", len(got))
	}
	if ps, _ := k.srv.Pool().Service("groq"); ps.RetryAfterCap != 2*time.Minute || ps.MaxEjectionPercent != 20 {
		t.Errorf("declared key policy in the pool: %v %d", ps.RetryAfterCap, ps.MaxEjectionPercent)
	}
	team := k.addTeam("t", nil)
	tok := k.addToken(team, nil)
	if code, m, _ := k.do("POST", "/v1/groq/openai/v1/chat/completions", tok, map[string]any{}); code != 200 {
		t.Fatalf("%d %v", code, m)
	}
	if up.last().Path != "/openai/v1/chat/completions" {
		t.Errorf("path %q", up.last().Path)
	}
	if _, m, _ := k.do("GET", "/admin/services/groq", k.admin, nil); m["header_timeout"] != "250ms" || m["request_timeout"] != "1h0m0s" || m["idle_timeout"] != nil {
		t.Errorf("declared timeouts: %v", m)
	}
	if err := k.stop(); err != nil {
		t.Fatal(err)
	}
	// Starting again with the same declaration adds nothing twice.
	k2 := startKP(t, func(c *server.Config) { c.Services = []server.ServiceSpec{spec}; c.Database = server.SecretURL(dbPath) })
	if got, _ := k2.srv.Pool().Stats("groq"); len(got) != 2 {
		t.Errorf("after restart: %d keys", len(got))
	}
}

// TestDeclaredRouterApplied: a router declared in the file before the
// services it routes to is created after them and serves; one naming a
// service that does not exist stops the start with the reason.
func TestDeclaredRouterApplied(t *testing.T) {
	up := newUpstream(t, okJSON)
	doc := `
services:
  - name: llm
    kind: router
    router: {max_attempts: 2, breaker_failures: 5, breaker_open_seconds: 30}
    routes:
      - model: fast
        targets: [{service: groq, path: /openai/v1, model: llama-3.1-8b-instant}]
  - name: groq
    base_url: ` + up.URL + `
    keys: [{key_value: ` + keyA + `}]
`
	cfg, err := server.ParseConfig([]byte(doc), os.LookupEnv)
	if err != nil {
		t.Fatal(err)
	}
	k := startKP(t, func(c *server.Config) { c.Services = cfg.Services })
	tok := k.addToken(k.addTeam("t", nil), nil)
	code, m, resp := k.do("POST", "/v1/llm/v1/chat/completions", tok, map[string]any{"model": "fast"})
	if code != 200 || resp.Header.Get("X-Keypool-Service") != "groq" {
		t.Fatalf("%d %v", code, m)
	}
	if last := up.last(); last.Path != "/openai/v1/chat/completions" || !strings.Contains(last.Body, "llama-3.1-8b-instant") {
		t.Errorf("upstream got %s %s", last.Path, last.Body)
	}
	if _, m, _ := k.do("GET", "/admin/services/llm", k.admin, nil); fmt.Sprint(m["router"]) != "map[breaker_failures:5 breaker_open_seconds:30 max_attempts:2]" {
		t.Errorf("declared router settings: %v", m["router"])
	}

	bad := []server.ServiceSpec{{Name: "llm", Kind: "router", Routes: []store.Route{{Model: "m", Targets: []store.Target{{Service: "nope"}}}}}}
	_, err = server.New(context.Background(), server.Config{
		Database: server.SecretURL("sqlite:" + filepath.Join(t.TempDir(), "k.db")), EncryptionKey: testEncKey,
		AdminToken: "kpadm_test_admin_token_0123456789abcdef", Services: bad, LogOutput: io.Discard, Output: io.Discard,
	})
	if err == nil || !strings.Contains(err.Error(), `service "nope" does not exist`) {
		t.Errorf("router to an unknown service: %v", err)
	}
}
