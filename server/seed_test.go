package server_test

import (
	"context"
	"encoding/json"
	"github.com/keypool/keypool/store"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
)

// TestHealthAlias: GET /health (keypooler's path) answers like /healthz.
func TestHealthAlias(t *testing.T) {
	k := startKP(t)
	for _, p := range []string{"/health", "/healthz"} {
		if code, m, _ := k.do("GET", p, "", nil); code != 200 || m["status"] != "ok" {
			t.Errorf("%s: %d %v", p, code, m)
		}
	}
}

// TestMetricFamiliesFromStart: every family the README lists is exported
// on the first scrape, before its first event; keypool_key_state has no
// half_open value (the API shows half-open as open or active).
func TestMetricFamiliesFromStart(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	setup(t, k, up, nil, keyA)
	_, m, _ := k.do("GET", "/metrics", "", nil)
	text := m["_raw"].(string)
	for _, fam := range []string{
		"keypool_key_state{", "keypool_key_in_flight{", "keypool_key_requests_last_minute{",
		`keypool_limiter_rejections_total{scope="token"} 0`,
		`keypool_limiter_rejections_total{scope="auth_failures"} 0`,
		`keypool_leases_total{result="ok",service="openai"} 0`,
		`keypool_budget_warnings_total{scope="team",unit="cost",window="day"} 0`,
		`keypool_budget_rejections_total{scope="token",unit="tokens",window="minute"} 0`,
		"keypool_usage_records_dropped_total 0",
		"keypool_requests_revoked_total 0",
		"keypool_key_events_dropped_total 0",
		`keypool_requests_total{code="",service="openai",status="200"} 0`,
		`keypool_key_cooldowns_total{key_id="`,
		`keypool_key_state_changes_total{service="openai",state="invalid"} 0`,
		`keypool_key_holds_total{kind="floor",service="openai"} 0`,
		`keypool_lease_reports_total{outcome="rate_limited"} 0`,
	} {
		if !strings.Contains(text, fam) {
			t.Errorf("metrics lack %q on the first scrape", fam)
		}
	}
	if strings.Contains(text, `state="half_open"`) {
		t.Errorf("keypool_key_state reports half_open")
	}
}

// TestReadyLoggedAfterBind: on a port conflict the log has the bind error
// and no "keypoold ready" line before it.
func TestReadyLoggedAfterBind(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	logs := &syncBuffer{}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := server.New(ctx, server.Config{
		Database:      server.SecretURL("sqlite:" + t.TempDir() + "/kp.db"),
		AdminToken:    keypool.Secret("kpadm_test_admin_token_0123456789abcdef"),
		EncryptionKey: testEncKey,
		LogOutput:     logs,
		Listen:        ln.Addr().String(),
		DataDir:       t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Run(ctx); err == nil || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("Run on a taken port = %v, want a listen error", err)
	}
	if strings.Contains(logs.String(), "keypoold ready") {
		t.Errorf("log says ready before the bind failed:\n%s", logs.String())
	}

	k := startKP(t)
	eventually(t, "ready logged once serving", func() bool { return strings.Contains(k.logs.String(), "keypoold ready") })
}

// TestSeedMessages: the admin API's messages a new user meets read right.
func TestSeedMessages(t *testing.T) {
	k := startKP(t)
	cases := []struct {
		body      map[string]any
		want, not string
	}{
		{map[string]any{"name": "a", "base_url": "localhost:22001"}, `did you mean "http://localhost:22001"`, "https://localhost"},
		{map[string]any{"name": "a", "base_url": "127.0.0.1:8080/v1"}, `did you mean "http://127.0.0.1:8080/v1"`, "https://127"},
		{map[string]any{"name": "a", "base_url": "api.openai.com"}, `did you mean "https://api.openai.com"`, "http://api"},
		{map[string]any{"name": "a", "base_url": "https://x.example", "auth_scheme": "nope"}, `unknown auth_scheme "nope"`, "auth_scheme: unknown auth_scheme"},
	}
	for _, c := range cases {
		code, m, _ := k.do("POST", "/admin/services", k.admin, c.body)
		msg, _ := m["error"].(map[string]any)["message"].(string)
		if code != 400 || !strings.Contains(msg, c.want) || strings.Contains(msg, c.not) {
			t.Errorf("%v: %d %q, want 400 with %q without %q", c.body, code, msg, c.want, c.not)
		}
	}
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	code, m, _ := k.do("POST", "/admin/keys/import", k.admin, []map[string]any{
		{"service": "openai", "key_value": "sk-import-good-0123456789abcdef"},
		{"service": "nosuch", "key_value": "sk-import-bad-0123456789abcdef"},
	})
	msg, _ := m["error"].(map[string]any)["message"].(string)
	if code != 400 || !strings.HasPrefix(msg, "1 of the import's lines was rejected") {
		t.Errorf("import with one bad line: %d %q", code, msg)
	}
}

// TestServiceSwitchedOff: is_active false answers 403 forbidden "service
// … is disabled" on the proxy and on GET /key, for the admin too; the
// keys and their state stay; switching it on serves again.
func TestServiceSwitchedOff(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, ids := setup(t, k, up, nil, keyA)
	m := k.mustAdmin("GET", "/admin/services/openai", nil, 200)
	if m["is_active"] != true {
		t.Fatalf("a new service is_active = %v, want true", m["is_active"])
	}
	k.mustAdmin("PATCH", "/admin/services/openai", map[string]any{"is_active": false, "description": "chat models"}, 200)
	before := len(up.seen())
	for _, c := range []struct{ method, path, token string }{
		{"POST", "/v1/openai/v1/chat/completions", tok},
		{"GET", "/key?service=openai", k.admin},
	} {
		code, m, _ := k.do(c.method, c.path, c.token, map[string]any{"model": "gpt-4o-mini"})
		e, _ := m["error"].(map[string]any)
		if code != 403 || e["code"] != "forbidden" || !strings.Contains(e["message"].(string), `service "openai" is disabled`) {
			t.Errorf("%s %s on a disabled service: %d %v", c.method, c.path, code, m)
		}
	}
	if n := len(up.seen()); n != before {
		t.Errorf("a disabled service reached its upstream %d times", n-before)
	}
	list := k.mustAdmin("GET", "/admin/services", nil, 200)
	if raw := list["_raw"]; raw != nil || !strings.Contains(fmtJSON(list), `"is_active":false`) || !strings.Contains(fmtJSON(list), `"description":"chat models"`) {
		t.Errorf("listing does not show the disabled service: %v", list)
	}
	if m := k.mustAdmin("GET", "/admin/keys/"+ids[0], nil, 200); m["state"] != "active" {
		t.Errorf("key of a disabled service: %v", m)
	}
	k.mustAdmin("PATCH", "/admin/services/openai", map[string]any{"is_active": true}, 200)
	if code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"}); code != 200 {
		t.Errorf("switched back on: %d %v", code, m)
	}
}

// TestDescriptions: services, teams and tokens take a description, shown
// in their listings; control characters are refused.
func TestDescriptions(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", map[string]any{"description": "OpenAI chat"})
	team := k.addTeam("eng", map[string]any{"description": "the engineers"})
	k.addToken(team, map[string]any{"description": "CI runner"})
	for path, want := range map[string]string{
		"/admin/services": "OpenAI chat", "/admin/teams": "the engineers", "/admin/tokens": "CI runner",
	} {
		if m := k.mustAdmin("GET", path, nil, 200); !strings.Contains(fmtJSON(m), `"description":"`+want+`"`) {
			t.Errorf("%s lacks description %q: %v", path, want, m)
		}
	}
	if code, _, _ := k.do("PATCH", "/admin/teams/"+team, k.admin, map[string]any{"description": "a\x00b"}); code != 400 {
		t.Errorf("control character in a description: %d, want 400", code)
	}
}

func fmtJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

const seedModelFile = `models:
  gemini-2.0-flash:
    structure: "gemini_text"
    module: "google.gemini_text"
    description: "Fast text generation model"
    cost_per_million_tokens:
      input: 0.075
      output: 0.3
  gemini-3-pro-image-preview:
    structure: "gemini_image_generation"
    module: "google.gemini_image"
    description: "Image generation model"
    cost_per_million_tokens:
      input: 0.0
      output: 0.039
`

// TestClientServices: the seed's model file loads as KEYPOOL_PRICES (one
// warning for its unknown keys); GET /services with a client key lists
// the services the caller may use (allowed, active) with the models its
// token may call and their descriptions.
func TestClientServices(t *testing.T) {
	path := t.TempDir() + "/google.yaml"
	if err := os.WriteFile(path, []byte(seedModelFile), 0o600); err != nil {
		t.Fatal(err)
	}
	k := startKP(t, func(c *server.Config) { c.PricesFile = path })
	eventually(t, "a warning for the model file's unknown keys", func() bool { return strings.Contains(k.logs.String(), "ignoring keys") })
	if n := k.logCount("ignoring keys", 1); n != 1 {
		t.Errorf("%d warnings for the model file's unknown keys, want 1", n)
	}
	models := []string{"gemini-2.0-flash", "gemini-3-pro-image-preview"}
	k.addService("google", "https://generativelanguage.googleapis.com", "header:x-goog-api-key",
		map[string]any{"description": "Google Gemini", "models_enabled": models})
	k.addService("groq", "https://api.groq.com/openai", "bearer", map[string]any{"is_active": false})
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	team := k.addTeam("eng", map[string]any{"allowed_services": []string{"google", "groq"}})
	tok := k.addToken(team, map[string]any{"models_enabled": []string{"gemini-2.0-flash"}})

	req, _ := http.NewRequest("GET", k.url+"/services", nil)
	req.Header.Set("X-API-Key", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Services []struct {
			Name, Description string
			Models            []struct{ ID, Description string }
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /services: %d %v", resp.StatusCode, err)
	}
	if len(got.Services) != 1 || got.Services[0].Name != "google" || got.Services[0].Description != "Google Gemini" ||
		len(got.Services[0].Models) != 1 || got.Services[0].Models[0].ID != "gemini-2.0-flash" ||
		got.Services[0].Models[0].Description != "Fast text generation model" {
		t.Errorf("GET /services = %+v", got)
	}
	if code, _, _ := k.do("GET", "/services", "kp_not_a_token", nil); code != 401 {
		t.Errorf("GET /services with a bad token: %d, want 401", code)
	}
}

// TestStreamWithoutUsageChargesObserved: an OpenAI-compatible server
// keypoold does not know (no llm_family, a loopback host, so no
// stream_options) streams 30 one-word chunks and no usage: the record
// charges the streamed text (30 tokens) and the request's input, not the
// full output reservation.
func TestStreamWithoutUsageChargesObserved(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for range 30 {
			_, _ = io.WriteString(w, `data: {"id":"c1","object":"chat.completion.chunk","model":"local-llm","choices":[{"index":0,"delta":{"content":"word"},"finish_reason":null}]}`+"\n\n")
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	})
	k := startKP(t, fastUsage)
	k.addService("vllm", up.URL, "bearer", nil)
	k.addKey("vllm", "sk-vllm-0123456789abcdef", nil)
	tok := k.addToken(k.addTeam("eng", nil), nil)
	body := `{"model":"local-llm","stream":true,"messages":[{"role":"user","content":"say thirty words"}]}`
	resp, _ := k.send("POST", "/v1/vllm/v1/chat/completions", tok, body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if strings.Contains(up.last().Body, "stream_options") {
		t.Fatalf("stream_options sent to an unknown host: %s", up.last().Body)
	}
	k.waitUsage(1)
	rows, _ := k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{})
	if len(rows) != 1 || rows[0].TokensOut != 30 || rows[0].TokensIn <= 0 || rows[0].TokensIn > 100 {
		t.Errorf("stream without usage charged %+v, want 30 tokens out and the request's input", rows)
	}
}

// TestKeyAliases: keypooler's POST /admin/keys {"name","key"} adds a key
// (its name kept as the label "name"); both key and key_value is 400.
func TestKeyAliases(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	m := k.mustAdmin("POST", "/admin/keys", map[string]any{"service": "openai", "name": "openai-1", "key": "sk-alias-0123456789abcdef"}, 201)
	k.secrets = append(k.secrets, "sk-alias-0123456789abcdef")
	if l, _ := m["labels"].(map[string]any); l["name"] != "openai-1" || m["hint"] == "" {
		t.Errorf("key added with aliases: %v", m)
	}
	if code, _, _ := k.do("POST", "/admin/keys", k.admin, map[string]any{"service": "openai", "key": "sk-a-0123456789abcdef", "key_value": "sk-b-0123456789abcdef"}); code != 400 {
		t.Errorf("key and key_value: %d, want 400", code)
	}
	k.checkLogs()
}

// TestLeaseByFeature: keypooler's GET /key?feature=image-generation
// without a service leases from the one service serving that feature; a
// feature no service (or several) serves is 400.
func TestLeaseByFeature(t *testing.T) {
	k := startKP(t)
	k.addService("openai", "https://api.openai.com", "bearer", nil)
	k.addService("groq", "https://api.groq.com", "bearer", nil)
	id := k.addKey("openai", "sk-img-0123456789abcdef", map[string]any{"labels": map[string]string{"feature": "image-generation"}})
	k.addKey("groq", "sk-chat-0123456789abcdef", map[string]any{"labels": map[string]string{"feature": "chat"}})
	k.addKey("openai", "sk-chat2-0123456789abcdef", map[string]any{"labels": map[string]string{"feature": "chat"}})
	tok := k.addToken(k.addTeam("eng", nil), map[string]any{"scopes": []string{"lease"}})
	code, m, _ := k.do("GET", "/key?feature=image-generation", tok, nil)
	if code != 200 || m["key_id"] != id || m["service"] != "openai" {
		t.Errorf("GET /key?feature=image-generation: %d %v", code, m)
	}
	for _, f := range []string{"chat", "video"} {
		if code, m, _ := k.do("GET", "/key?feature="+f, tok, nil); code != 400 {
			t.Errorf("GET /key?feature=%s: %d %v, want 400", f, code, m)
		}
	}
}
