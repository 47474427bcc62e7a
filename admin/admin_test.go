package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
	"github.com/keypool/keypool/store/storetest"
)

const adminToken = "test-admin-token-0123456789"

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer = testutil.SyncBuffer

// env is an admin API over a real store and pool, behind httptest.
type env struct {
	t    *testing.T
	st   store.Store
	pool *keypool.Pool
	auth *auth.Authenticator
	srv  *httptest.Server
	logs *syncBuffer

	mu        sync.Mutex
	responses []string // every response body, for secret checks
	changes   int
}

type backend struct {
	name string
	dsn  func(t *testing.T) string
}

var backends = []backend{
	{"sqlite", func(t *testing.T) string { return "sqlite:" + filepath.Join(t.TempDir(), "kp.db") }},
	{"postgres", func(t *testing.T) string { return storetest.PostgresDSN(t) }},
}

// forEachBackend runs fn on SQLite, and on PostgreSQL when
// KEYPOOL_TEST_POSTGRES is set.
func forEachBackend(t *testing.T, fn func(t *testing.T, b backend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { fn(t, b) })
	}
}

func newEnv(t *testing.T, b backend, mod ...func(*admin.Config)) *env {
	t.Helper()
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	kr, err := seal.ParseKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	st, err := sqlstore.Open(context.Background(), b.dsn(t), sqlstore.Options{Keyring: kr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	pool, err := keypool.New(keypool.Config{})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, st: st, pool: pool, logs: &syncBuffer{}}
	e.auth = auth.New(st, auth.Config{AdminToken: adminToken})
	cfg := admin.Config{
		Store: st, Pool: pool, Auth: e.auth,
		OnChange: e.reload,
		Logger:   slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, m := range mod {
		m(&cfg)
	}
	api, err := admin.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(api)
	t.Cleanup(e.srv.Close)
	return e
}

// reload loads the pool from the store, as keypoold does on OnChange. It
// runs in the handler goroutine, so it reports with t.Error only.
func (e *env) reload() {
	e.mu.Lock()
	e.changes++
	e.mu.Unlock()
	ctx := context.Background()
	ss, err := e.st.Services(ctx)
	if err != nil {
		e.t.Errorf("reload: %v", err)
		return
	}
	keep := map[string]bool{}
	for _, s := range ss {
		keep[s.Name] = true
		ks, err := e.st.Keys(ctx, s.Name)
		if err != nil {
			e.t.Errorf("reload: %v", err)
			return
		}
		scheme, _ := keypool.ParseAuthScheme(s.AuthScheme)
		sel, _ := keypool.ParseSelector(s.Selector)
		keys := make([]keypool.Key, 0, len(ks))
		for _, k := range ks {
			st, _ := keypool.ParseState(k.Status)
			keys = append(keys, keypool.Key{ID: k.ID, Secret: k.Secret, Weight: k.Weight, Priority: k.Priority,
				RateLimitRPM: k.RateLimitRPM, Labels: k.Labels, BalanceTotal: k.BalanceTotal, BalanceUsed: k.BalanceUsed,
				BalanceUnit: k.BalanceUnit, State: st, Reason: k.StatusReason})
		}
		if err := e.pool.SetService(keypool.Service{Name: s.Name, BaseURL: s.BaseURL, Auth: scheme, Selector: sel,
			RateLimitRPM: s.RateLimitRPM}, keys); err != nil {
			e.t.Errorf("reload %s: %v", s.Name, err)
		}
	}
	for _, n := range e.pool.Services() {
		if !keep[n] {
			e.pool.RemoveService(n)
		}
	}
}

type resp struct {
	status int
	header http.Header
	body   []byte
}

func (r resp) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("response is not a JSON object: %v: %s", err, r.body)
	}
	return m
}

// code returns the error code of an error response.
func (r resp) code() string {
	var b struct {
		Error struct{ Code, Message, Type string } `json:"error"`
	}
	_ = json.Unmarshal(r.body, &b)
	return b.Error.Code
}

func (r resp) message() string {
	var b struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	_ = json.Unmarshal(r.body, &b)
	return b.Error.Message
}

type reqOpt func(*http.Request)

func withToken(tok string) reqOpt {
	return func(r *http.Request) {
		if tok == "" {
			r.Header.Del("Authorization")
		} else {
			r.Header.Set("Authorization", "Bearer "+tok)
		}
	}
}

func withHeader(k, v string) reqOpt { return func(r *http.Request) { r.Header.Set(k, v) } }

// do sends a request with the admin token and a JSON body (a string is
// sent as is, anything else marshalled).
func (e *env) do(method, path string, body any, opts ...reqOpt) resp {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for _, o := range opts {
		o(req)
	}
	res, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	e.mu.Lock()
	e.responses = append(e.responses, string(b)+fmt.Sprint(res.Header))
	e.mu.Unlock()
	return resp{status: res.StatusCode, header: res.Header, body: b}
}

// must sends a request and fails unless the status is want.
func (e *env) must(want int, method, path string, body any, opts ...reqOpt) resp {
	e.t.Helper()
	r := e.do(method, path, body, opts...)
	if r.status != want {
		e.t.Fatalf("%s %s: status %d, want %d: %s", method, path, r.status, want, r.body)
	}
	return r
}

// noSecret fails if s appears in any response or log line so far.
func (e *env) noSecret(s string, skip ...string) {
	e.t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
outer:
	for i, r := range e.responses {
		for _, sk := range skip {
			if strings.Contains(r, sk) {
				continue outer
			}
		}
		if strings.Contains(r, s) {
			e.t.Errorf("secret found in response %d: %s", i, r)
		}
	}
	if strings.Contains(e.logs.String(), s) {
		e.t.Errorf("secret found in logs")
	}
}

// badCase is one request that must fail with a status and code, and whose
// message must mention a word (the field).
type badCase struct {
	name    string
	method  string
	path    string
	body    any
	opts    []reqOpt
	status  int
	code    string
	mention string
}

func (e *env) runBad(t *testing.T, cases []badCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := e.do(c.method, c.path, c.body, c.opts...)
			if r.status != c.status || r.code() != c.code {
				t.Fatalf("status %d code %q, want %d %q: %s", r.status, r.code(), c.status, c.code, r.body)
			}
			if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type %q", ct)
			}
			if c.mention != "" && !strings.Contains(r.message(), c.mention) {
				t.Errorf("message %q does not mention %q", r.message(), c.mention)
			}
		})
	}
}

var bigBody = `{"name":"x","display_name":"` + strings.Repeat("a", 1<<20+10) + `"}`

func TestAdminAuth(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		team := e.must(201, "POST", "/admin/teams", map[string]any{"name": "eng"}).json(t)
		tok := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "t", "team_id": team["id"]}).json(t)["token"].(string)

		e.runBad(t, []badCase{
			{"no token", "GET", "/admin/services", nil, []reqOpt{withToken("")}, 401, "invalid_token", "admin token"},
			{"wrong token", "GET", "/admin/services", nil, []reqOpt{withToken("nope")}, 401, "invalid_token", ""},
			{"admin token prefix", "GET", "/admin/services", nil, []reqOpt{withToken(adminToken[:10])}, 401, "invalid_token", ""},
			{"team token", "GET", "/admin/services", nil, []reqOpt{withToken(tok)}, 401, "invalid_token", ""},
			{"basic scheme", "GET", "/admin/services", nil, []reqOpt{withHeader("Authorization", "Basic "+adminToken)}, 401, "invalid_token", ""},
			{"team token write", "POST", "/admin/services", `{"name":"x","base_url":"http://x"}`, []reqOpt{withToken(tok)}, 401, "invalid_token", ""},
			{"unknown path", "GET", "/admin/nope", nil, nil, 404, "not_found", ""},
			{"method not allowed", "PUT", "/admin/services", nil, nil, 405, "method_not_allowed", "GET"},
			{"method not allowed on id", "POST", "/admin/keys/abc", nil, nil, 405, "method_not_allowed", ""},
		})
		if r := e.do("GET", "/admin/services", nil, withToken("")); r.header.Get("WWW-Authenticate") == "" {
			t.Error("401 without WWW-Authenticate")
		}
		// The team token did not reach the services table.
		if ss, _ := e.st.Services(context.Background()); len(ss) != 0 {
			t.Fatal("a team token wrote through the admin API")
		}
		e.noSecret(tok, `"token":"kp_`)
		e.noSecret(adminToken)
	})
}

func TestAdminFailureLimiter(t *testing.T) {
	fl := auth.NewFailureLimiter(auth.FailureConfig{Max: 3, Window: time.Minute})
	e := newEnv(t, backends[0], func(c *admin.Config) { c.Failures = fl })
	for range 3 {
		e.must(401, "GET", "/admin/services", nil, withToken("bad"))
	}
	r := e.must(429, "GET", "/admin/services", nil, withToken("bad"))
	if r.code() != "rate_limited" || r.header.Get("Retry-After") == "" {
		t.Fatalf("429 without rate_limited / Retry-After: %v %s", r.header, r.body)
	}
	// The admin token from the same address is always served.
	e.must(200, "GET", "/admin/services", nil)
	e.must(429, "GET", "/admin/services", nil, withToken("bad"))
}

func TestServices(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		svc := map[string]any{
			"name": "openai", "display_name": "OpenAI", "base_url": "https://api.openai.com/",
			"auth_scheme": "bearer", "rate_limit_rpm": 60, "proxy_headers": map[string]string{"openai-beta": "assistants=v2"},
			"selector": "weighted", "external_name": "openai", "max_in_flight": 8, "models_enabled": []string{"gpt-4o"},
			"rpm_limit": 100, "tpm_limit": 1000, "daily_token_limit": 10000, "limit_cost_day_warn": 5.5, "limit_cost_day_block": 10,
			"limit_tokens_month_block": 1e6, "prices": map[string]any{"gpt-4o": map[string]any{"input": 2.5, "output": 10}},
			"llm_family": "OpenAI-Compatible",
		}
		got := e.must(201, "POST", "/admin/services", svc).json(t)
		for k, want := range map[string]any{
			"llm_family": "openai", "name": "openai", "base_url": "https://api.openai.com", "auth_scheme": "bearer", "selector": "weighted",
			"rate_limit_rpm": 60.0, "max_in_flight": 8.0, "rpm_limit": 100.0, "limit_cost_day_warn": 5.5,
		} {
			if got[k] != want {
				t.Errorf("%s = %v, want %v", k, got[k], want)
			}
		}
		if h := got["proxy_headers"].(map[string]any); h["Openai-Beta"] != "assistants=v2" {
			t.Errorf("proxy_headers = %v", h)
		}
		if p, ok := got["prices"].(map[string]any); !ok || p["gpt-4o"] == nil {
			t.Errorf("prices = %#v, want an object", got["prices"])
		}
		if e.changes == 0 {
			t.Error("OnChange not called")
		}
		if _, ok := e.pool.Service("openai"); !ok {
			t.Error("pool not reloaded")
		}
		e.must(201, "POST", "/admin/services", map[string]any{"name": "ollama", "base_url": "http://127.0.0.1:11434"})
		e.must(201, "POST", "/admin/services", map[string]any{"name": "vllm", "base_url": "http://10.0.0.5:8000/v1", "auth_scheme": "header:X-Goog-Api-Key"})
		e.must(201, "POST", "/admin/services", map[string]any{"name": "local", "base_url": "http://localhost:8080", "auth_scheme": "query:key"})
		e.must(201, "POST", "/admin/services", map[string]any{"name": "v6", "base_url": "http://[::1]:9000"})

		list := e.must(200, "GET", "/admin/services", nil).json(t)["services"].([]any)
		if len(list) != 5 {
			t.Fatalf("listed %d services", len(list))
		}
		one := e.must(200, "GET", "/admin/services/openai", nil).json(t)
		if one["display_name"] != "OpenAI" {
			t.Errorf("GET = %v", one)
		}

		// PATCH changes only what is present.
		p := e.must(200, "PATCH", "/admin/services/openai", `{"display_name":"OpenAI prod","rate_limit_rpm":120}`).json(t)
		if p["display_name"] != "OpenAI prod" || p["rate_limit_rpm"] != 120.0 || p["base_url"] != "https://api.openai.com" ||
			p["selector"] != "weighted" || p["limit_cost_day_block"] != 10.0 {
			t.Errorf("PATCH = %v", p)
		}
		p = e.must(200, "PATCH", "/admin/services/openai", `{"models_enabled":[],"proxy_headers":{}}`).json(t)
		if p["models_enabled"] != nil || p["proxy_headers"] != nil {
			t.Errorf("clearing lists: %v", p)
		}

		long := map[string]any{"name": strings.Repeat("a", 65), "base_url": "http://x"}
		e.runBad(t, []badCase{
			{"malformed JSON", "POST", "/admin/services", `{"name":`, nil, 400, "bad_request", "JSON"},
			{"not an object", "POST", "/admin/services", `[1]`, nil, 400, "bad_request", ""},
			{"trailing data", "POST", "/admin/services", `{"name":"a","base_url":"http://a"} {}`, nil, 400, "bad_request", "single"},
			{"empty body", "POST", "/admin/services", ``, nil, 400, "bad_request", "empty"},
			{"unknown field", "POST", "/admin/services", `{"name":"a","base_url":"http://a","colour":"red"}`, nil, 400, "bad_request", "colour"},
			{"wrong type", "POST", "/admin/services", `{"name":"a","base_url":"http://a","rate_limit_rpm":"60"}`, nil, 400, "bad_request", "rate_limit_rpm"},
			{"wrong content type", "POST", "/admin/services", `{"name":"a","base_url":"http://a"}`, []reqOpt{withHeader("Content-Type", "text/plain")}, 400, "bad_request", "Content-Type"},
			{"oversized", "POST", "/admin/services", bigBody, nil, 413, "request_too_large", ""},
			{"missing name", "POST", "/admin/services", `{"base_url":"http://a"}`, nil, 400, "bad_request", "name"},
			{"bad name", "POST", "/admin/services", `{"name":"Open AI","base_url":"http://a"}`, nil, 400, "bad_request", "name"},
			{"name too long", "POST", "/admin/services", long, nil, 400, "bad_request", "name"},
			{"missing base_url", "POST", "/admin/services", `{"name":"a"}`, nil, 400, "bad_request", "base_url"},
			{"duplicate", "POST", "/admin/services", `{"name":"openai","base_url":"http://a"}`, nil, 409, "conflict", "openai"},
			{"bad auth_scheme", "POST", "/admin/services", `{"name":"a","base_url":"http://a","auth_scheme":"magic"}`, nil, 400, "bad_request", "auth_scheme"},
			{"auth_scheme lists options", "POST", "/admin/services", `{"name":"a","base_url":"http://a","auth_scheme":"magic"}`, nil, 400, "bad_request", "x-api-key"},
			{"bad selector", "POST", "/admin/services", `{"name":"a","base_url":"http://a","selector":"best"}`, nil, 400, "bad_request", "round_robin"},
			{"negative rpm", "POST", "/admin/services", `{"name":"a","base_url":"http://a","rate_limit_rpm":-1}`, nil, 400, "bad_request", "rate_limit_rpm"},
			{"negative limit", "POST", "/admin/services", `{"name":"a","base_url":"http://a","limit_cost_hour_block":-1}`, nil, 400, "bad_request", "limit_cost_hour_block"},
			{"metadata IPv4", "POST", "/admin/services", `{"name":"a","base_url":"http://169.254.169.254/latest"}`, nil, 400, "bad_request", "base_url"},
			{"link-local IPv4", "POST", "/admin/services", `{"name":"a","base_url":"https://169.254.1.1"}`, nil, 400, "bad_request", "base_url"},
			{"metadata mapped IPv6", "POST", "/admin/services", `{"name":"a","base_url":"http://[::ffff:169.254.169.254]/"}`, nil, 400, "bad_request", "base_url"},
			{"link-local IPv6", "POST", "/admin/services", `{"name":"a","base_url":"http://[fe80::1]/"}`, nil, 400, "bad_request", "base_url"},
			{"gcp metadata", "POST", "/admin/services", `{"name":"a","base_url":"http://metadata.google.internal/computeMetadata/v1"}`, nil, 400, "bad_request", "base_url"},
			{"gcp metadata dot", "POST", "/admin/services", `{"name":"a","base_url":"http://Metadata.Google.Internal./"}`, nil, 400, "bad_request", "base_url"},
			{"alibaba metadata", "POST", "/admin/services", `{"name":"a","base_url":"http://100.100.100.200"}`, nil, 400, "bad_request", "base_url"},
			{"decimal IP", "POST", "/admin/services", `{"name":"a","base_url":"http://2852039166/"}`, nil, 400, "bad_request", "base_url"},
			{"hex IP", "POST", "/admin/services", `{"name":"a","base_url":"http://0xa9fea9fe/"}`, nil, 400, "bad_request", "base_url"},
			{"file scheme", "POST", "/admin/services", `{"name":"a","base_url":"file:///etc/passwd"}`, nil, 400, "bad_request", "base_url"},
			{"ftp scheme", "POST", "/admin/services", `{"name":"a","base_url":"ftp://example.com"}`, nil, 400, "bad_request", "base_url"},
			{"no scheme", "POST", "/admin/services", `{"name":"a","base_url":"api.openai.com"}`, nil, 400, "bad_request", "base_url"},
			{"no host", "POST", "/admin/services", `{"name":"a","base_url":"http:///v1"}`, nil, 400, "bad_request", "base_url"},
			{"userinfo", "POST", "/admin/services", `{"name":"a","base_url":"https://user:pw@example.com"}`, nil, 400, "bad_request", "base_url"},
			{"query", "POST", "/admin/services", `{"name":"a","base_url":"https://example.com/?key=1"}`, nil, 400, "bad_request", "base_url"},
			{"hop-by-hop header", "POST", "/admin/services", `{"name":"a","base_url":"http://a","proxy_headers":{"Connection":"close"}}`, nil, 400, "bad_request", "proxy_headers"},
			{"host header", "POST", "/admin/services", `{"name":"a","base_url":"http://a","proxy_headers":{"host":"evil"}}`, nil, 400, "bad_request", "proxy_headers"},
			{"content-length header", "POST", "/admin/services", `{"name":"a","base_url":"http://a","proxy_headers":{"Content-Length":"1"}}`, nil, 400, "bad_request", "proxy_headers"},
			{"bad header name", "POST", "/admin/services", `{"name":"a","base_url":"http://a","proxy_headers":{"Bad Header":"1"}}`, nil, 400, "bad_request", "proxy_headers"},
			{"bad header value", "POST", "/admin/services", `{"name":"a","base_url":"http://a","proxy_headers":{"X-A":"1\r\nX-B: 2"}}`, nil, 400, "bad_request", "proxy_headers"},
			{"negative price", "POST", "/admin/services", `{"name":"a","base_url":"http://a","prices":{"m":{"input":-1}}}`, nil, 400, "bad_request", "prices"},
			{"unknown price field", "POST", "/admin/services", `{"name":"a","base_url":"http://a","prices":{"m":{"inptu":1}}}`, nil, 400, "bad_request", "prices"},
			{"bad llm_family", "POST", "/admin/services", `{"name":"a","base_url":"http://a","llm_family":"cohere"}`, nil, 400, "bad_request", "llm_family"},
			{"prices not object", "POST", "/admin/services", `{"name":"a","base_url":"http://a","prices":[1]}`, nil, 400, "bad_request", "prices"},
			{"unknown query", "POST", "/admin/services?x=1", `{"name":"a","base_url":"http://a"}`, nil, 400, "bad_request", "x"},
			{"get missing", "GET", "/admin/services/nope", nil, nil, 404, "not_found", "nope"},
			{"patch missing", "PATCH", "/admin/services/nope", `{}`, nil, 404, "not_found", "nope"},
			{"patch unknown field", "PATCH", "/admin/services/openai", `{"nme":"x"}`, nil, 400, "bad_request", "nme"},
			{"patch wrong type", "PATCH", "/admin/services/openai", `{"display_name":5}`, nil, 400, "bad_request", "display_name"},
			{"patch rename", "PATCH", "/admin/services/openai", `{"name":"other"}`, nil, 400, "bad_request", "name"},
			{"patch bad base_url", "PATCH", "/admin/services/openai", `{"base_url":"http://169.254.169.254"}`, nil, 400, "bad_request", "base_url"},
			{"patch null base_url", "PATCH", "/admin/services/openai", `{"base_url":null}`, nil, 400, "bad_request", "base_url"},
			{"patch bad selector", "PATCH", "/admin/services/openai", `{"selector":"x"}`, nil, 400, "bad_request", "selector"},
			{"patch oversized", "PATCH", "/admin/services/openai", bigBody, nil, 413, "request_too_large", ""},
			{"delete missing", "DELETE", "/admin/services/nope", nil, nil, 404, "not_found", ""},
		})
		// Nothing of the bad requests was written.
		if s, _ := e.st.GetService(context.Background(), "openai"); s.BaseURL != "https://api.openai.com" || s.Selector != "weighted" {
			t.Errorf("a failed PATCH changed the service: %+v", s)
		}
		if ss, _ := e.st.Services(context.Background()); len(ss) != 5 {
			t.Errorf("%d services after bad requests, want 5", len(ss))
		}

		// DELETE removes the service and its keys.
		e.must(201, "POST", "/admin/keys", map[string]any{"service": "ollama", "key_value": "ollama-key-0001-abcdef"})
		r := e.must(204, "DELETE", "/admin/services/ollama", nil)
		if len(r.body) != 0 {
			t.Errorf("204 with a body: %s", r.body)
		}
		e.must(404, "GET", "/admin/services/ollama", nil)
		if ks, _ := e.st.Keys(context.Background(), "ollama"); len(ks) != 0 {
			t.Error("keys of a deleted service remain")
		}
		if _, ok := e.pool.Service("ollama"); ok {
			t.Error("deleted service still in the pool")
		}
		e.noSecret("ollama-key-0001-abcdef")
	})
}

func TestMetadataAllowed(t *testing.T) {
	e := newEnv(t, backends[0], func(c *admin.Config) { c.AllowMetadataUpstreams = true })
	e.must(201, "POST", "/admin/services", `{"name":"md","base_url":"http://169.254.169.254"}`)
	e.must(400, "POST", "/admin/services", `{"name":"f","base_url":"file:///etc/passwd"}`)
}

func TestKeys(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		e.must(201, "POST", "/admin/services", `{"name":"openai","base_url":"https://api.openai.com","rate_limit_rpm":60}`)
		e.must(201, "POST", "/admin/services", `{"name":"exa","base_url":"https://api.exa.ai","auth_scheme":"x-api-key"}`)
		const v1, v2, v3 = "sk-abc123secretvalue-f9c2", "sk-def456othersecret-77aa", "exa-key-secret-000000001"
		k := e.must(201, "POST", "/admin/keys", map[string]any{
			"service": "openai", "key_value": v1, "balance_total": 5.0, "balance_unit": "usd",
			"account_email": "user1@example.com", "weight": 2, "priority": 1, "rate_limit_rpm": 30,
			"max_in_flight": 4, "labels": map[string]string{"tier": "pro"},
		}).json(t)
		id := k["id"].(string)
		if k["hint"] != "sk-a…f9c2" || k["service"] != "openai" || k["state"] != "active" || k["weight"] != 2.0 ||
			k["balance_total"] != 5.0 || k["balance_unit"] != "usd" || k["account_email"] != "user1@example.com" {
			t.Errorf("created key = %v", k)
		}
		if _, ok := k["key_value"]; ok {
			t.Error("key_value echoed")
		}
		id2 := e.must(201, "POST", "/admin/keys", map[string]any{"service": "openai", "key_value": v2}).json(t)["id"].(string)
		e.must(201, "POST", "/admin/keys", map[string]any{"service": "exa", "key_value": v3})

		list := e.must(200, "GET", "/admin/keys?service=openai", nil).json(t)["keys"].([]any)
		if len(list) != 2 {
			t.Fatalf("listed %d keys", len(list))
		}
		first := list[0].(map[string]any)
		for _, f := range []string{"id", "service", "hint", "state", "cooldown_until", "in_flight", "requests_last_minute",
			"balance_total", "labels", "weight", "created_at"} {
			if _, ok := first[f]; !ok {
				t.Errorf("listing lacks %s: %v", f, first)
			}
		}
		if all := e.must(200, "GET", "/admin/keys", nil).json(t)["keys"].([]any); len(all) != 3 {
			t.Errorf("listed %d keys in all services", len(all))
		}

		// Live state: a 429 makes the key cool down.
		lease, err := e.pool.Acquire("openai", keypool.Request{Exclude: []string{id2}})
		if err != nil {
			t.Fatal(err)
		}
		if lease.KeyID() != id {
			t.Fatalf("leased %s", lease.KeyID())
		}
		lease.Release(keypool.Outcome{Kind: keypool.RateLimited, RetryAfter: 30 * time.Second})
		g := e.must(200, "GET", "/admin/keys/"+id, nil).json(t)
		if g["state"] != "cooling" || g["cooldown_until"] == nil || g["requests_last_minute"] != 1.0 {
			t.Errorf("after a 429: %v", g)
		}

		// An invalid key is re-enabled by PATCH status=active.
		e.pool.SetKeyState("openai", id2, keypool.StateInvalid, time.Time{}, "401")
		if err := e.st.SetKeyStatus(context.Background(), id2, store.StatusInvalid, "401"); err != nil {
			t.Fatal(err)
		}
		if g := e.must(200, "GET", "/admin/keys/"+id2, nil).json(t); g["state"] != "invalid" {
			t.Errorf("state = %v, want invalid", g["state"])
		}
		p := e.must(200, "PATCH", "/admin/keys/"+id2, `{"status":"active"}`).json(t)
		if p["state"] != "active" || p["status"] != "active" {
			t.Errorf("after re-enable: %v", p)
		}
		p = e.must(200, "PATCH", "/admin/keys/"+id2, `{"status":"disabled","weight":3,"labels":{"feature":"search"}}`).json(t)
		if p["state"] != "disabled" || p["weight"] != 3.0 || p["labels"].(map[string]any)["feature"] != "search" {
			t.Errorf("after disable: %v", p)
		}
		if _, err := e.pool.Acquire("openai", keypool.Request{Exclude: []string{id}}); err == nil {
			t.Error("a disabled key was leased")
		}
		// Partial: the weight stays.
		p = e.must(200, "PATCH", "/admin/keys/"+id2, `{"priority":7}`).json(t)
		if p["weight"] != 3.0 || p["priority"] != 7.0 || p["status"] != "disabled" {
			t.Errorf("partial PATCH: %v", p)
		}

		// Rotation.
		const v4 = "sk-rotatedvalue123456-beef"
		p = e.must(200, "PATCH", "/admin/keys/"+id2, map[string]any{"key_value": v4}).json(t)
		if p["hint"] != "sk-r…beef" {
			t.Errorf("hint after rotation = %v", p["hint"])
		}
		if sk, _ := e.st.GetKey(context.Background(), id2); sk.Secret.Reveal() != v4 {
			t.Error("rotation not stored")
		}

		e.runBad(t, []badCase{
			{"unknown service", "POST", "/admin/keys", `{"service":"nope","key_value":"abcdefghijklmnop"}`, nil, 400, "bad_request", "service"},
			{"missing service", "POST", "/admin/keys", `{"key_value":"abcdefghijklmnop"}`, nil, 400, "bad_request", "service"},
			{"missing key_value", "POST", "/admin/keys", `{"service":"openai"}`, nil, 400, "bad_request", "key_value"},
			{"empty key_value", "POST", "/admin/keys", `{"service":"openai","key_value":""}`, nil, 400, "bad_request", "key_value"},
			{"key_value with space", "POST", "/admin/keys", `{"service":"openai","key_value":"sk-has space-secret"}`, nil, 400, "bad_request", "key_value"},
			{"key_value wrong type", "POST", "/admin/keys", `{"service":"openai","key_value":12345}`, nil, 400, "bad_request", "key_value"},
			{"duplicate", "POST", "/admin/keys", map[string]any{"service": "openai", "key_value": v1}, nil, 409, "conflict", "openai"},
			{"negative weight", "POST", "/admin/keys", `{"service":"openai","key_value":"abcdefghijklmnop","weight":-1}`, nil, 400, "bad_request", "weight"},
			{"negative balance", "POST", "/admin/keys", `{"service":"openai","key_value":"abcdefghijklmnop","balance_total":-5}`, nil, 400, "bad_request", "balance_total"},
			{"bad status", "POST", "/admin/keys", `{"service":"openai","key_value":"abcdefghijklmnop","status":"cooling"}`, nil, 400, "bad_request", "status"},
			{"labels wrong type", "POST", "/admin/keys", `{"service":"openai","key_value":"abcdefghijklmnop","labels":{"a":1}}`, nil, 400, "bad_request", "labels"},
			{"unknown field", "POST", "/admin/keys", `{"service":"openai","key_value":"abcdefghijklmnop","secret":"x"}`, nil, 400, "bad_request", "secret"},
			{"malformed", "POST", "/admin/keys", `{"service":"openai",`, nil, 400, "bad_request", ""},
			{"oversized", "POST", "/admin/keys", `{"service":"openai","key_value":"` + strings.Repeat("k", 1<<20) + `"}`, nil, 413, "request_too_large", ""},
			{"list unknown service", "GET", "/admin/keys?service=nope", nil, nil, 404, "not_found", "nope"},
			{"list unknown param", "GET", "/admin/keys?servce=openai", nil, nil, 400, "bad_request", "servce"},
			{"get bad id", "GET", "/admin/keys/key_doesnotexist", nil, nil, 404, "not_found", ""},
			{"patch bad id", "PATCH", "/admin/keys/key_doesnotexist", `{"weight":1}`, nil, 404, "not_found", ""},
			{"delete bad id", "DELETE", "/admin/keys/key_doesnotexist", nil, nil, 404, "not_found", ""},
			{"patch status invalid", "PATCH", "/admin/keys/" + id, `{"status":"invalid"}`, nil, 400, "bad_request", "status"},
			{"patch move service", "PATCH", "/admin/keys/" + id, `{"service":"exa"}`, nil, 400, "bad_request", "service"},
			{"patch duplicate value", "PATCH", "/admin/keys/" + id, map[string]any{"key_value": v4}, nil, 409, "conflict", ""},
			{"patch null value", "PATCH", "/admin/keys/" + id, `{"key_value":null}`, nil, 400, "bad_request", "key_value"},
			{"patch unknown field", "PATCH", "/admin/keys/" + id, `{"wieght":1}`, nil, 400, "bad_request", "wieght"},
			{"patch wrong type", "PATCH", "/admin/keys/" + id, `{"weight":"heavy"}`, nil, 400, "bad_request", "weight"},
		})
		if sk, _ := e.st.GetKey(context.Background(), id); sk.Secret.Reveal() != v1 || sk.Weight != 2 {
			t.Error("a failed PATCH changed the key")
		}

		e.must(204, "DELETE", "/admin/keys/"+id, nil)
		e.must(404, "GET", "/admin/keys/"+id, nil)

		for _, v := range []string{v1, v2, v3, v4, "sk-has space-secret"} {
			e.noSecret(v)
		}
	})
}

func TestImport(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		e.must(201, "POST", "/admin/services", `{"name":"groq","base_url":"https://api.groq.com"}`)
		e.must(201, "POST", "/admin/services", `{"name":"exa","base_url":"https://api.exa.ai"}`)
		const existing = "gsk_existing_secret_000000"
		e.must(201, "POST", "/admin/keys", map[string]any{"service": "groq", "key_value": existing})
		count := func() int {
			ks, err := e.st.Keys(context.Background(), "")
			if err != nil {
				t.Fatal(err)
			}
			return len(ks)
		}
		text := withHeader("Content-Type", "text/plain; charset=utf-8")

		r := e.must(201, "POST", "/admin/keys/import?service=groq", "gsk_one_secret_1111111111\n\n# comment\ngsk_two_secret_2222222222\r\n  gsk_three_secret_333333333  \n", text).json(t)
		if r["created"] != 3.0 || len(r["keys"].([]any)) != 3 {
			t.Fatalf("text import = %v", r)
		}
		if count() != 4 {
			t.Fatalf("%d keys after import", count())
		}
		r = e.must(201, "POST", "/admin/keys/import?service=groq", `[{"key_value":"gsk_json_secret_44444444","weight":2},
			{"service":"exa","key_value":"exa_json_secret_5555555","labels":{"feature":"search"}}]`).json(t)
		if r["created"] != 2.0 {
			t.Fatalf("JSON import = %v", r)
		}
		if count() != 6 {
			t.Fatalf("%d keys after JSON import", count())
		}

		// A bad batch writes nothing and names every bad line.
		bad := "gsk_ok_secret_aaaaaaaaaaaa\ngsk bad space secret\ngsk_dup_secret_bbbbbbbbbbb\ngsk_dup_secret_bbbbbbbbbbb\n" + existing + "\n"
		res := e.must(400, "POST", "/admin/keys/import?service=groq", bad, text)
		var body struct {
			Error struct{ Code string } `json:"error"`
			Lines []struct {
				Line    int
				Code    string
				Message string
			} `json:"lines"`
		}
		if err := json.Unmarshal(res.body, &body); err != nil {
			t.Fatal(err)
		}
		if body.Error.Code != "bad_request" || len(body.Lines) != 3 ||
			body.Lines[0].Line != 2 || body.Lines[0].Code != "bad_request" ||
			body.Lines[1].Line != 4 || body.Lines[1].Code != "conflict" || !strings.Contains(body.Lines[1].Message, "line 3") ||
			body.Lines[2].Line != 5 || body.Lines[2].Code != "conflict" {
			t.Fatalf("per-line errors = %s", res.body)
		}
		if count() != 6 {
			t.Fatalf("a failed import wrote keys: %d", count())
		}
		// Only duplicates: 409.
		res = e.must(409, "POST", "/admin/keys/import?service=groq", existing+"\n", text)
		if res.code() != "conflict" {
			t.Errorf("code = %s", res.code())
		}
		e.runBad(t, []badCase{
			{"text without service", "POST", "/admin/keys/import", "abcdefghijkl\n", []reqOpt{text}, 400, "bad_request", "service"},
			{"unknown service", "POST", "/admin/keys/import?service=nope", "abcdefghijkl\n", []reqOpt{text}, 400, "bad_request", ""},
			{"empty", "POST", "/admin/keys/import?service=groq", "\n# nothing\n", []reqOpt{text}, 400, "bad_request", "no keys"},
			{"JSON not array", "POST", "/admin/keys/import", `{"service":"groq","key_value":"abcdefghijkl"}`, nil, 400, "bad_request", "array"},
			{"JSON malformed", "POST", "/admin/keys/import", `[{"service":"groq",`, nil, 400, "bad_request", "JSON"},
			{"JSON unknown field", "POST", "/admin/keys/import", `[{"service":"groq","key_value":"abcdefghijkl1"},{"service":"groq","key_value":"abcdefghijkl2","x":1}]`, nil, 400, "bad_request", ""},
			{"JSON no service", "POST", "/admin/keys/import", `[{"key_value":"abcdefghijkl"}]`, nil, 400, "bad_request", ""},
			{"JSON unknown service", "POST", "/admin/keys/import", `[{"service":"nope","key_value":"abcdefghijkl"}]`, nil, 400, "bad_request", ""},
			{"bad content type", "POST", "/admin/keys/import?service=groq", "a", []reqOpt{withHeader("Content-Type", "application/xml")}, 400, "bad_request", "Content-Type"},
			{"oversized", "POST", "/admin/keys/import?service=groq", strings.Repeat("k", 16<<20+1), []reqOpt{text}, 413, "request_too_large", ""},
		})
		if count() != 6 {
			t.Fatalf("bad imports wrote keys: %d", count())
		}
		res = e.must(400, "POST", "/admin/keys/import", `[{"service":"groq","key_value":"abcdefghijkl1"},{"service":"groq","key_value":"abcdefghijkl2","x":1}]`)
		if !strings.Contains(string(res.body), `"line":2`) || !strings.Contains(string(res.body), `x`) {
			t.Errorf("JSON element error = %s", res.body)
		}
		for _, v := range []string{existing, "gsk_one_secret_1111111111", "gsk bad space secret", "gsk_dup_secret_bbbbbbbbbbb",
			"gsk_ok_secret_aaaaaaaaaaaa", "exa_json_secret_5555555", "abcdefghijkl1"} {
			e.noSecret(v)
		}
	})
}

// TestImportUnknownTier: an import line naming a tier that does not
// exist is rejected with its line and the tier named; by default nothing
// is written, with ?partial=true the other lines are, and the answer
// lists the rejected ones.
func TestImportUnknownTier(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		e.must(201, "POST", "/admin/services", `{"name":"groq","base_url":"https://api.groq.com"}`)
		e.must(201, "POST", "/admin/tiers", `{"name":"pro","features":{"image-generation":100}}`)
		count := func() int {
			ks, err := e.st.Keys(context.Background(), "")
			if err != nil {
				t.Fatal(err)
			}
			return len(ks)
		}
		type answer struct {
			Created  int
			Keys     []struct{ Tier string }
			Rejected []struct {
				Line    int
				Code    string
				Message string
			}
			Lines []struct {
				Line    int
				Message string
			}
		}
		decode := func(res resp) answer {
			var a answer
			if err := json.Unmarshal(res.body, &a); err != nil {
				t.Fatal(err)
			}
			return a
		}
		batch := `[{"key_value":"gsk_tier_pro_111111111111","tier":"pro"},
			{"key_value":"gsk_tier_gold_22222222222","tier":"gold"},
			{"key_value":"gsk_no_tier_3333333333333"},
			{"key_value":"gsk_tier_gold_44444444444","tier":"gold"}]`
		a := decode(e.must(400, "POST", "/admin/keys/import?service=groq", batch))
		if len(a.Lines) != 2 || a.Lines[0].Line != 2 || a.Lines[1].Line != 4 || !strings.Contains(a.Lines[0].Message, `tier "gold" does not exist`) {
			t.Fatalf("per-line errors = %+v", a.Lines)
		}
		if count() != 0 {
			t.Fatalf("an all-or-nothing import with a bad line wrote %d keys", count())
		}
		a = decode(e.must(201, "POST", "/admin/keys/import?service=groq&partial=true", batch))
		if a.Created != 2 || len(a.Keys) != 2 || a.Keys[0].Tier != "pro" || len(a.Rejected) != 2 ||
			a.Rejected[0].Line != 2 || a.Rejected[1].Line != 4 || !strings.Contains(a.Rejected[1].Message, `"gold"`) {
			t.Fatalf("partial import = %+v", a)
		}
		if count() != 2 {
			t.Fatalf("%d keys after the partial import, want 2", count())
		}
		text := withHeader("Content-Type", "text/plain")
		a = decode(e.must(400, "POST", "/admin/keys/import?service=groq&tier=gold&partial=true", "gsk_text_gold_555555555555\n", text))
		if len(a.Lines) != 1 || !strings.Contains(a.Lines[0].Message, `"gold"`) {
			t.Fatalf("text import into an unknown tier = %+v", a)
		}
		a = decode(e.must(201, "POST", "/admin/keys/import?service=groq&tier=pro", "gsk_text_pro_6666666666666\n", text))
		if a.Created != 1 || a.Keys[0].Tier != "pro" {
			t.Fatalf("text import with ?tier = %+v", a)
		}
		e.runBad(t, []badCase{
			{"partial not a bool", "POST", "/admin/keys/import?service=groq&partial=maybe", "gsk_x_77777777777777\n", []reqOpt{text}, 400, "bad_request", "partial"},
			{"tier with JSON", "POST", "/admin/keys/import?service=groq&tier=pro", `[{"key_value":"gsk_x_88888888888888"}]`, nil, 400, "bad_request", "tier"},
		})
		if count() != 3 {
			t.Fatalf("%d keys at the end, want 3", count())
		}
	})
}

func TestClients(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		ctx := context.Background()
		team := e.must(201, "POST", "/admin/teams", `{"name":"engineering","rpm_limit":600,"tpm_limit":200000,"daily_token_limit":5000000,
			"limit_cost_day_block":50,"limit_tokens_day_warn":1000,"models_enabled":["gpt-4o"],"allowed_services":["openai"]}`).json(t)
		teamID := team["id"].(string)
		if team["rpm_limit"] != 600.0 || team["daily_token_limit"] != 5e6 || team["name"] != "engineering" {
			t.Errorf("team = %v", team)
		}
		other := e.must(201, "POST", "/admin/teams", `{"name":"ops"}`).json(t)["id"].(string)
		user := e.must(201, "POST", "/admin/users", map[string]any{"external_id": "alice@example.com", "team_id": teamID}).json(t)
		userID := user["id"].(string)

		created := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "dev-laptop", "team_id": teamID,
			"scopes": []string{"lease"}, "rpm_limit": 5, "models_enabled": []string{"gpt-4o-mini"}}).json(t)
		tok := created["token"].(string)
		for _, f := range []string{"id", "token", "prefix", "name", "team_id", "user_id", "scopes", "expires_at", "created_at"} {
			if _, ok := created[f]; !ok {
				t.Errorf("create response lacks %s", f)
			}
		}
		if !strings.HasPrefix(tok, "kp_") || created["prefix"] != tok[:8] || created["rpm_limit"] != 5.0 {
			t.Errorf("created token = %v", created)
		}
		p, err := e.auth.Authenticate(ctx, tok)
		if err != nil || p.Team.ID != teamID || !p.HasScope("lease") {
			t.Fatalf("created token does not authenticate: %v", err)
		}
		exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
		ut := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "alice", "user_id": userID, "expires_at": exp}).json(t)
		utok := ut["token"].(string)
		if ut["team_id"] != teamID || ut["user_id"] != userID || ut["expires_at"] == nil {
			t.Errorf("user token = %v", ut)
		}
		tokID, utokID := created["id"].(string), ut["id"].(string)

		// Listings: metadata only.
		ls := e.must(200, "GET", "/admin/tokens?team_id="+teamID, nil)
		if n := len(ls.json(t)["tokens"].([]any)); n != 2 {
			t.Errorf("listed %d tokens", n)
		}
		if strings.Contains(string(ls.body), `"token"`) || strings.Contains(string(ls.body), `"hash"`) {
			t.Errorf("listing carries a token or hash: %s", ls.body)
		}
		e.must(200, "GET", "/admin/tokens", nil)
		g := e.must(200, "GET", "/admin/tokens/"+tokID, nil).json(t)
		if g["prefix"] != tok[:8] || g["is_active"] != true {
			t.Errorf("GET token = %v", g)
		}
		if n := len(e.must(200, "GET", "/admin/teams", nil).json(t)["teams"].([]any)); n != 2 {
			t.Errorf("listed %d teams", n)
		}
		if n := len(e.must(200, "GET", "/admin/users?team_id="+teamID, nil).json(t)["users"].([]any)); n != 1 {
			t.Errorf("listed %d users", n)
		}
		if n := len(e.must(200, "GET", "/admin/users?team_id="+other, nil).json(t)["users"].([]any)); n != 0 {
			t.Errorf("listed %d users of ops", n)
		}
		e.must(200, "GET", "/admin/teams/"+teamID, nil)
		e.must(200, "GET", "/admin/users/"+userID, nil)

		// PATCH team: partial.
		pt := e.must(200, "PATCH", "/admin/teams/"+teamID, `{"rpm_limit":10}`).json(t)
		if pt["rpm_limit"] != 10.0 || pt["tpm_limit"] != 200000.0 || pt["name"] != "engineering" {
			t.Errorf("PATCH team = %v", pt)
		}
		p, _ = e.auth.Authenticate(ctx, tok)
		if p == nil || p.Team.RPMLimit != 10 {
			t.Error("team limits not refreshed in the auth cache")
		}
		// PATCH user moves its tokens to the other team.
		e.must(200, "PATCH", "/admin/users/"+userID, map[string]any{"team_id": other})
		if p, err := e.auth.Authenticate(ctx, utok); err != nil || p.Team.ID != other {
			t.Errorf("user token after move: %v %v", p, err)
		}

		// Revocation is immediate on this replica.
		rv := e.must(200, "PATCH", "/admin/tokens/"+tokID, `{"is_active":false,"name":"revoked"}`).json(t)
		if rv["is_active"] != false || rv["name"] != "revoked" || rv["rpm_limit"] != 5.0 {
			t.Errorf("PATCH token = %v", rv)
		}
		if _, err := e.auth.Authenticate(ctx, tok); err == nil {
			t.Error("revoked token still authenticates")
		}
		e.must(200, "PATCH", "/admin/tokens/"+tokID, `{"is_active":true,"expires_at":null}`)
		if _, err := e.auth.Authenticate(ctx, tok); err != nil {
			t.Errorf("re-activated token: %v", err)
		}

		past := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
		e.runBad(t, []badCase{
			{"team missing name", "POST", "/admin/teams", `{"rpm_limit":1}`, nil, 400, "bad_request", "name"},
			{"team empty name", "POST", "/admin/teams", `{"name":"  "}`, nil, 400, "bad_request", "name"},
			{"team duplicate", "POST", "/admin/teams", `{"name":"engineering"}`, nil, 409, "conflict", "engineering"},
			{"team negative limit", "POST", "/admin/teams", `{"name":"x","tpm_limit":-1}`, nil, 400, "bad_request", "tpm_limit"},
			{"team bad service", "POST", "/admin/teams", `{"name":"x","allowed_services":["Bad Name"]}`, nil, 400, "bad_request", "allowed_services"},
			{"team unknown field", "POST", "/admin/teams", `{"name":"x","rpm":1}`, nil, 400, "bad_request", "rpm"},
			{"team wrong type", "POST", "/admin/teams", `{"name":"x","models_enabled":"gpt-4o"}`, nil, 400, "bad_request", "models_enabled"},
			{"team malformed", "POST", "/admin/teams", `{"name"`, nil, 400, "bad_request", ""},
			{"team oversized", "POST", "/admin/teams", bigBody, nil, 413, "request_too_large", ""},
			{"team bad id", "GET", "/admin/teams/team_nope", nil, nil, 404, "not_found", ""},
			{"team patch bad id", "PATCH", "/admin/teams/team_nope", `{"name":"x"}`, nil, 404, "not_found", ""},
			{"team patch rename clash", "PATCH", "/admin/teams/" + other, `{"name":"engineering"}`, nil, 409, "conflict", ""},
			{"team delete bad id", "DELETE", "/admin/teams/team_nope", nil, nil, 404, "not_found", ""},
			{"user missing team", "POST", "/admin/users", `{"external_id":"bob"}`, nil, 400, "bad_request", "team_id"},
			{"user unknown team", "POST", "/admin/users", `{"external_id":"bob","team_id":"team_nope"}`, nil, 400, "bad_request", "team_id"},
			{"user duplicate", "POST", "/admin/users", map[string]any{"external_id": "alice@example.com", "team_id": teamID}, nil, 409, "conflict", ""},
			{"user unknown field", "POST", "/admin/users", `{"external_id":"bob","team_id":"x","email":"b"}`, nil, 400, "bad_request", "email"},
			{"user bad id", "GET", "/admin/users/user_nope", nil, nil, 404, "not_found", ""},
			{"user list unknown team", "GET", "/admin/users?team_id=team_nope", nil, nil, 404, "not_found", ""},
			{"token no owner", "POST", "/admin/tokens", `{"name":"x"}`, nil, 400, "bad_request", "team_id"},
			{"token unknown team", "POST", "/admin/tokens", `{"name":"x","team_id":"team_nope"}`, nil, 400, "bad_request", "team_id"},
			{"token unknown user", "POST", "/admin/tokens", `{"name":"x","user_id":"user_nope"}`, nil, 400, "bad_request", "user_id"},
			{"token user in other team", "POST", "/admin/tokens", map[string]any{"user_id": userID, "team_id": teamID}, nil, 400, "bad_request", "team_id"},
			{"token unknown scope", "POST", "/admin/tokens", map[string]any{"team_id": teamID, "scopes": []string{"admin"}}, nil, 400, "bad_request", "scope"},
			{"token expired", "POST", "/admin/tokens", map[string]any{"team_id": teamID, "expires_at": past}, nil, 400, "bad_request", "expires_at"},
			{"token bad time", "POST", "/admin/tokens", map[string]any{"team_id": teamID, "expires_at": "tomorrow"}, nil, 400, "bad_request", ""},
			{"token unknown field", "POST", "/admin/tokens", map[string]any{"team_id": teamID, "token": "kp_mine"}, nil, 400, "bad_request", "token"},
			{"token bad id", "GET", "/admin/tokens/tok_nope", nil, nil, 404, "not_found", ""},
			{"token patch bad id", "PATCH", "/admin/tokens/tok_nope", `{"is_active":false}`, nil, 404, "not_found", ""},
			{"token patch move", "PATCH", "/admin/tokens/" + tokID, map[string]any{"team_id": other}, nil, 400, "bad_request", "team"},
			{"token patch wrong type", "PATCH", "/admin/tokens/" + tokID, `{"is_active":"no"}`, nil, 400, "bad_request", "is_active"},
			{"token patch null active", "PATCH", "/admin/tokens/" + tokID, `{"is_active":null}`, nil, 400, "bad_request", "is_active"},
			{"token list unknown team", "GET", "/admin/tokens?team_id=team_nope", nil, nil, 404, "not_found", ""},
			{"token delete bad id", "DELETE", "/admin/tokens/tok_nope", nil, nil, 404, "not_found", ""},
		})

		// DELETE token: refused at once.
		e.must(204, "DELETE", "/admin/tokens/"+utokID, nil)
		if _, err := e.auth.Authenticate(ctx, utok); err == nil {
			t.Error("deleted token still authenticates")
		}
		e.must(204, "DELETE", "/admin/users/"+userID, nil)
		e.must(404, "GET", "/admin/users/"+userID, nil)
		e.must(204, "DELETE", "/admin/teams/"+teamID, nil)
		if _, err := e.auth.Authenticate(ctx, tok); err == nil {
			t.Error("token of a deleted team still authenticates")
		}
		e.must(404, "GET", "/admin/tokens/"+tokID, nil)

		// Token plaintext only in its create response.
		e.noSecret(tok, `"token":"`+tok)
		e.noSecret(utok, `"token":"`+utok)
	})
}

func TestUsageAndHealth(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := newEnv(t, b)
		ctx := context.Background()
		e.must(201, "POST", "/admin/services", `{"name":"openai","base_url":"https://api.openai.com"}`)
		e.must(201, "POST", "/admin/services", `{"name":"groq","base_url":"https://api.groq.com"}`)
		k1 := e.must(201, "POST", "/admin/keys", `{"service":"openai","key_value":"sk-usage-secret-0000000001"}`).json(t)["id"].(string)
		e.must(201, "POST", "/admin/keys", `{"service":"openai","key_value":"sk-usage-secret-0000000002"}`)
		e.must(201, "POST", "/admin/keys", `{"service":"groq","key_value":"gsk-usage-secret-000000003"}`)
		team := e.must(201, "POST", "/admin/teams", `{"name":"=eng"}`).json(t)["id"].(string)
		tok := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "ci", "team_id": team}).json(t)["id"].(string)

		day1 := time.Date(2025, 1, 30, 10, 0, 0, 0, time.UTC)
		day2 := day1.AddDate(0, 0, 1)
		recs := []store.UsageRecord{
			{Time: day1, TeamID: team, TokenID: tok, Service: "openai", KeyID: k1, Model: "gpt-4o", Status: 200, TokensIn: 100, TokensOut: 50, Cost: 0.01},
			{Time: day1, TeamID: team, TokenID: tok, Service: "openai", KeyID: k1, Model: "gpt-4o", Status: 200, TokensIn: 10, TokensOut: 5, Cost: 0.002},
			{Time: day2, TeamID: team, TokenID: tok, Service: "groq", Model: "llama", Status: 200, TokensIn: 1, TokensOut: 1, Cost: 0},
		}
		if err := e.st.AppendUsage(ctx, recs); err != nil {
			t.Fatal(err)
		}
		rows := e.must(200, "GET", "/admin/usage?group_by=team,service", nil).json(t)["rows"].([]any)
		if len(rows) != 2 {
			t.Fatalf("rows = %v", rows)
		}
		r0 := rows[1].(map[string]any)
		if r0["team_id"] != team || r0["team_name"] != "=eng" || r0["service"] != "openai" || r0["requests"] != 2.0 ||
			r0["tokens_in"] != 110.0 || r0["tokens_out"] != 55.0 {
			t.Errorf("row = %v", r0)
		}
		rows = e.must(200, "GET", "/admin/usage?group_by=token,key,model,day&service=openai&since=2025-01-30&until=2025-01-30", nil).json(t)["rows"].([]any)
		if len(rows) != 1 {
			t.Fatalf("filtered rows = %v", rows)
		}
		r1 := rows[0].(map[string]any)
		if r1["token_name"] != "ci" || r1["key_id"] != k1 || r1["key_hint"] != "sk-u…0001" || r1["day"] != "2025-01-30" || r1["model"] != "gpt-4o" {
			t.Errorf("row = %v", r1)
		}
		rows = e.must(200, "GET", "/admin/usage?team=%3Deng&since=2025-01-31T00:00:00Z", nil).json(t)["rows"].([]any)
		if len(rows) != 1 || rows[0].(map[string]any)["requests"] != 1.0 {
			t.Errorf("team by name, since = %v", rows)
		}
		c := e.must(200, "GET", "/admin/usage?group_by=team,service&format=csv", nil)
		if ct := c.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
			t.Errorf("CSV Content-Type %q", ct)
		}
		lines := strings.Split(strings.TrimSpace(string(c.body)), "\n")
		if lines[0] != "team_id,team_name,service,requests,tokens_in,tokens_out,cost" || len(lines) != 3 || !strings.Contains(lines[2], ",'=eng,openai,2,110,55,0.012") {
			t.Errorf("CSV = %q", c.body)
		}
		if c := e.must(200, "GET", "/admin/usage?group_by=service", nil, withHeader("Accept", "text/csv")); !strings.HasPrefix(string(c.body), "service,requests") {
			t.Errorf("Accept: text/csv gave %q", c.body)
		}
		e.runBad(t, []badCase{
			{"bad group", "GET", "/admin/usage?group_by=team,colour", nil, nil, 400, "bad_request", "colour"},
			{"bad since", "GET", "/admin/usage?since=yesterday", nil, nil, 400, "bad_request", "since"},
			{"bad until", "GET", "/admin/usage?until=2025-13-01", nil, nil, 400, "bad_request", "until"},
			{"until before since", "GET", "/admin/usage?since=2025-02-01&until=2025-01-01", nil, nil, 400, "bad_request", "until"},
			{"bad format", "GET", "/admin/usage?format=xml", nil, nil, 400, "bad_request", "format"},
			{"unknown param", "GET", "/admin/usage?tema=x", nil, nil, 400, "bad_request", "tema"},
			{"POST usage", "POST", "/admin/usage", `{}`, nil, 405, "method_not_allowed", ""},
		})

		// Health: counts by state from the pool.
		e.pool.SetKeyState("openai", k1, keypool.StateInvalid, time.Time{}, "401")
		h := e.must(200, "GET", "/admin/health", nil).json(t)
		svcs := h["services"].([]any)
		if len(svcs) != 2 {
			t.Fatalf("health services = %v", svcs)
		}
		var oa map[string]any
		for _, s := range svcs {
			if s.(map[string]any)["name"] == "openai" {
				oa = s.(map[string]any)
			}
		}
		st := oa["states"].(map[string]any)
		if oa["keys"] != 2.0 || st["invalid"] != 1.0 || st["active"] != 1.0 || st["cooling"] != 0.0 || len(oa["key_stats"].([]any)) != 2 {
			t.Errorf("health openai = %v", oa)
		}
		ks := oa["key_stats"].([]any)[0].(map[string]any)
		if _, ok := ks["requests_last_minute"]; !ok {
			t.Errorf("key stats = %v", ks)
		}
		for _, v := range []string{"sk-usage-secret-0000000001", "sk-usage-secret-0000000002", "gsk-usage-secret-000000003"} {
			e.noSecret(v)
		}
	})
}

func TestNewValidates(t *testing.T) {
	if _, err := admin.New(admin.Config{}); err == nil {
		t.Error("New without a store succeeded")
	}
}
