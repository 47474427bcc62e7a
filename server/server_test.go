package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

const (
	keyA = "sk-test-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	keyB = "sk-test-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
	keyC = "sk-test-CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC"
)

// setup starts keypoold with service "openai" on up (bearer), the given
// keys, a team and a token; it returns the token.
func setup(t *testing.T, k *kp, up *upstream, team map[string]any, keys ...string) (token string, ids []string) {
	t.Helper()
	k.addService("openai", up.URL, "bearer", nil)
	for _, v := range keys {
		ids = append(ids, k.addKey("openai", v, nil))
	}
	teamID := k.addTeam("engineering", team)
	return k.addToken(teamID, nil), ids
}

func TestProxyTokenPlaces(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, ids := setup(t, k, up, nil, keyA)

	cases := []struct {
		name  string
		query string
		set   func(h http.Header)
	}{
		{"bearer", "", func(h http.Header) { h.Set("Authorization", "Bearer "+tok) }},
		{"token", "", func(h http.Header) { h.Set("Authorization", "Token "+tok) }},
		{"raw authorization", "", func(h http.Header) { h.Set("Authorization", tok) }},
		{"x-api-key", "", func(h http.Header) { h.Set("X-Api-Key", tok) }},
		{"xi-api-key", "", func(h http.Header) { h.Set("Xi-Api-Key", tok) }},
		{"x-goog-api-key", "", func(h http.Header) { h.Set("X-Goog-Api-Key", tok) }},
		{"query api_key", "api_key=" + tok, func(http.Header) {}},
		{"query key", "key=" + tok, func(http.Header) {}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			target := k.url + "/v1/openai/v1/chat/completions?x=1"
			if tc.query != "" {
				target += "&" + tc.query
			}
			req, _ := http.NewRequest("POST", target, strings.NewReader(`{"model":"gpt-4o-mini","messages":[]}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Cookie", "session=abc")
			tc.set(req.Header)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			if got := resp.Header.Get("X-Keypool-Key-Id"); got != ids[0] {
				t.Errorf("X-Keypool-Key-Id = %q, want %q", got, ids[0])
			}
			if resp.Header.Get("X-Request-Id") == "" {
				t.Error("no X-Request-Id on the response")
			}
			s := up.last()
			if s.Path != "/v1/chat/completions" {
				t.Errorf("upstream path %q", s.Path)
			}
			if got := bearerKey(s.Header); got != keyA {
				t.Errorf("upstream Authorization carries %q, want the pooled key", got)
			}
			dump := fmt.Sprint(s.Header) + s.RawQuery + s.Body
			if strings.Contains(dump, tok) {
				t.Errorf("the team token reached the upstream: %s", dump)
			}
			if s.Header.Get("Cookie") != "" {
				t.Error("Cookie reached the upstream")
			}
			if q, _ := url.ParseQuery(s.RawQuery); q.Get("x") != "1" {
				t.Errorf("query not kept: %q", s.RawQuery)
			}
		})
	}
}

func TestProxyAuthErrors(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA)
	other := k.addTeam("other", map[string]any{"allowed_services": []string{"groq"}})
	otherTok := k.addToken(other, nil)

	cases := []struct {
		name, path, token string
		status            int
		code              string
	}{
		{"no token", "/v1/openai/v1/models", "", 401, "invalid_token"},
		{"bad token", "/v1/openai/v1/models", "kp_nope", 401, "invalid_token"},
		{"admin token on data plane", "/v1/openai/v1/models", k.admin, 401, "invalid_token"},
		{"client token on admin plane", "/admin/services", tok, 401, "invalid_token"},
		{"unknown service", "/v1/nope/v1/models", tok, 404, "unknown_service"},
		{"service not allowed", "/v1/openai/v1/models", otherTok, 403, "forbidden"},
		{"dot segments", "/v1/openai/v1/%2e%2e/admin", tok, 400, "bad_request"},
		{"unknown endpoint", "/nope", tok, 404, "not_found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, m, _ := k.do("GET", tc.path, tc.token, nil)
			if code != tc.status {
				t.Fatalf("status %d %v, want %d", code, m, tc.status)
			}
			e, _ := m["error"].(map[string]any)
			if e["code"] != tc.code {
				t.Errorf("code %v, want %s", e["code"], tc.code)
			}
		})
	}
	if n := len(up.seen()); n != 0 {
		t.Errorf("upstream saw %d requests, want 0", n)
	}
}

func TestFailover(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch bearerKey(r.Header) {
		case keyA:
			w.Header().Set("Retry-After", "30")
			w.WriteHeader(429)
			_, _ = io.WriteString(w, `{"error":{"message":"rate limited"}}`)
		case keyB:
			w.WriteHeader(401)
			_, _ = io.WriteString(w, `{"error":{"message":"bad key"}}`)
		default:
			okJSON(w, r)
		}
	})
	k := startKP(t)
	tok, ids := setup(t, k, up, nil, keyA, keyB, keyC)
	for i := range 3 {
		code, m, resp := k.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"})
		if code != 200 {
			t.Fatalf("request %d: %d %v", i, code, m)
		}
		if got := resp.Header.Get("X-Keypool-Key-Id"); got != ids[2] {
			t.Errorf("request %d served by %s, want %s", i, got, ids[2])
		}
	}
	if _, m, _ := k.do("GET", "/metrics", "", nil); !strings.Contains(m["_raw"].(string), `keypool_retries_total{service="openai"}`) ||
		!strings.Contains(m["_raw"].(string), `keypool_key_cooldowns_total{key_id="`+ids[0]+`",service="openai"} 1`) {
		t.Error("retries or cooldowns not counted")
	}
	// Key B answered 401: it is invalid, and that is persisted.
	eventually(t, "key B persisted as invalid", func() bool {
		m := k.mustAdmin("GET", "/admin/keys/"+ids[1], nil, 200)
		return m["status"] == "invalid" || m["state"] == "invalid"
	})
	st := k.srv.Store()
	eventually(t, "store status", func() bool {
		key, err := st.GetKey(context.Background(), ids[1])
		return err == nil && key.Status == store.StatusInvalid
	})
	key, _ := st.GetKey(context.Background(), ids[0])
	if key.Status != store.StatusActive {
		t.Errorf("a cooling key was persisted as %q; cooldowns are transient", key.Status)
	}
}

func TestRateLimitedVersusNoKey(t *testing.T) {
	var limited atomic.Bool
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if limited.Load() {
			w.Header().Set("Retry-After", "40")
			w.WriteHeader(429)
			return
		}
		okJSON(w, r)
	})
	k := startKP(t)
	tok, _ := setup(t, k, up, map[string]any{"rpm_limit": 2}, keyA, keyB)

	for i := range 2 {
		if code, m, _ := k.do("GET", "/v1/openai/v1/models", tok, nil); code != 200 {
			t.Fatalf("request %d: %d %v", i, code, m)
		}
	}
	code, m, resp := k.do("GET", "/v1/openai/v1/models", tok, nil)
	if code != 429 || m["error"].(map[string]any)["code"] != "rate_limited" {
		t.Fatalf("third request: %d %v, want 429 rate_limited", code, m)
	}
	if ra := resp.Header.Get("Retry-After"); ra == "" || ra == "0" {
		t.Errorf("rate_limited without Retry-After")
	}

	if _, m, _ := k.do("GET", "/metrics", "", nil); !strings.Contains(m["_raw"].(string), `keypool_limiter_rejections_total{scope="team"} 1`) {
		t.Error("limiter rejection not counted")
	}

	// A second team has no limit; every key answers 429.
	team2 := k.addTeam("unlimited", nil)
	tok2 := k.addToken(team2, nil)
	limited.Store(true)
	code, m, resp = k.do("GET", "/v1/openai/v1/models", tok2, nil)
	if code != 429 {
		t.Fatalf("all keys limited: %d %v", code, m)
	}
	// The last upstream 429 passes through; the next request finds no key.
	code, m, resp = k.do("GET", "/v1/openai/v1/models", tok2, nil)
	if code != 429 || m["error"].(map[string]any)["code"] != "no_key_available" {
		t.Fatalf("after cooldown: %d %v, want 429 no_key_available", code, m)
	}
	if ra := resp.Header.Get("Retry-After"); ra == "" || ra == "0" {
		t.Errorf("no_key_available without Retry-After")
	}
}

func TestLeaseAndReport(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("exa", up.URL, "x-api-key", nil)
	idA := k.addKey("exa", keyA, map[string]any{"labels": map[string]string{"feature": "search"}})
	idB := k.addKey("exa", keyB, map[string]any{"labels": map[string]string{"feature": "image-gen"}})
	team := k.addTeam("bots", nil)
	leaser := k.addToken(team, map[string]any{"scopes": []string{"lease"}})
	plain := k.addToken(team, nil)

	code, m, resp := k.do("GET", "/key?service=exa&feature=image-gen", leaser, nil)
	if code != 200 || m["key_id"] != idB || m["value"] != keyB || m["service"] != "exa" {
		t.Fatalf("lease: %d %v", code, m)
	}
	leaseB, _ := m["lease_id"].(string)
	if resp.Header.Get("Cache-Control") != "no-store" {
		t.Error("a leased key may be cached")
	}
	if code, m, _ := k.do("GET", "/key?service=exa", plain, nil); code != 403 {
		t.Errorf("lease without scope: %d %v, want 403", code, m)
	}
	if code, m, _ := k.do("GET", "/key?service=exa&feature=search", k.admin, nil); code != 200 || m["key_id"] != idA {
		t.Errorf("admin lease: %d %v", code, m)
	}
	if code, _, _ := k.do("GET", "/key?service=nope", leaser, nil); code != 404 {
		t.Errorf("unknown service: %d, want 404", code)
	}

	// Report a 429 on B: it cools down; image-gen has no other key.
	code, m, _ = k.do("POST", "/key/"+idB+"/report", leaser, map[string]any{"outcome": "rate_limited", "retry_after": 30, "lease_id": leaseB})
	if code != 200 || m["state"] != "cooling" {
		t.Fatalf("report: %d %v", code, m)
	}
	code, m, resp = k.do("GET", "/key?service=exa&feature=image-gen", leaser, nil)
	if code != 429 || m["error"].(map[string]any)["code"] != "no_key_available" || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("lease of a cooling key: %d %v", code, m)
	}
	// A report with no lease outstanding still feeds the state machine.
	code, m, _ = k.do("POST", "/key/"+idA+"/report", k.admin, map[string]any{"outcome": "invalid"})
	if code != 200 || m["state"] != "invalid" {
		t.Fatalf("report invalid: %d %v", code, m)
	}
	for _, tc := range []struct {
		name   string
		path   string
		body   any
		status int
	}{
		{"unknown key", "/key/nope/report", map[string]any{"outcome": "ok", "lease_id": leaseB}, 404},
		{"bad outcome", "/key/" + idA + "/report", map[string]any{"outcome": "meh"}, 400},
		{"unknown field", "/key/" + idA + "/report", map[string]any{"outcome": "ok", "x": 1}, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code, m, _ := k.do("POST", tc.path, leaser, tc.body); code != tc.status {
				t.Errorf("%d %v, want %d", code, m, tc.status)
			}
		})
	}
	k.checkLogs()
}

func TestHealthAndMetrics(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA, keyB)
	if code, m, _ := k.do("GET", "/healthz", "", nil); code != 200 || m["status"] != "ok" {
		t.Errorf("healthz: %d %v", code, m)
	}
	if code, m, _ := k.do("GET", "/readyz", "", nil); code != 200 || m["status"] != "ready" || m["keys"] != float64(2) {
		t.Errorf("readyz: %d %v", code, m)
	}
	for range 3 {
		k.do("POST", "/v1/openai/v1/chat/completions?api_key="+tok, "", map[string]any{"model": "gpt-4o-mini"})
	}
	k.do("GET", "/v1/openai/v1/models", "kp_bad", nil)
	_, m, _ := k.do("GET", "/metrics", "", nil)
	text := m["_raw"].(string)
	for _, want := range []string{
		`keypool_requests_total{code="",service="openai",status="200"} 3`,
		`keypool_key_state{key_id=`,
		`state="active"} 1`,
		`keypool_upstream_duration_seconds_bucket{service="openai"`,
		`go_goroutines`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	k.checkNoSecrets("metrics", text)
	k.checkLogs()

	// After shutdown (as while draining) readiness fails with a reason.
	rec := httptest.NewRecorder()
	k.srv.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), "shutting down") || !strings.Contains(rec.Body.String(), `"code":"unavailable"`) {
		t.Errorf("readyz after shutdown: %d %s", rec.Code, rec.Body.String())
	}
}

func TestAccessLogAndRequestID(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA)
	req, _ := http.NewRequest("GET", k.url+"/v1/openai/v1/models?key="+tok, nil)
	req.Header.Set("X-Request-Id", "req-12345")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("X-Request-Id") != "req-12345" {
		t.Errorf("X-Request-Id = %q", resp.Header.Get("X-Request-Id"))
	}
	var line map[string]any
	eventually(t, "access line", func() bool {
		for _, l := range strings.Split(k.logs.String(), "\n") {
			if strings.Contains(l, `"req-12345"`) && strings.Contains(l, `"msg":"request"`) {
				_ = json.Unmarshal([]byte(l), &line)
				return true
			}
		}
		return false
	})
	if line["status"] != float64(200) || line["service"] != "openai" || line["key_id"] == nil || line["path"] != "/v1/openai/v1/models" {
		t.Errorf("access line: %v", line)
	}
	k.checkLogs()
}

// TestAccessLogRedactsTokenInPath: a client that put its token in the
// path is refused, and its access line shows the path with the token
// redacted.
func TestAccessLogRedactsTokenInPath(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA)
	req, _ := http.NewRequest("GET", k.url+"/v1/openai/v1/"+tok+"/models", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("X-Request-Id", "req-path-token")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("status %d, want 400", resp.StatusCode)
	}
	var line map[string]any
	eventually(t, "access line", func() bool {
		for _, l := range strings.Split(k.logs.String(), "\n") {
			if strings.Contains(l, `"req-path-token"`) && strings.Contains(l, `"msg":"request"`) {
				_ = json.Unmarshal([]byte(l), &line)
				return true
			}
		}
		return false
	})
	if line["path"] != "/v1/openai/v1/[redacted]/models" {
		t.Errorf("access line path %v", line["path"])
	}
	k.checkLogs()
}

func TestGracefulShutdown(t *testing.T) {
	release := make(chan struct{})
	arrived := make(chan struct{}, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			<-release
		}
		okJSON(w, r)
	})
	k := startKP(t)
	tok, _ := setup(t, k, up, nil, keyA)
	for range 3 {
		if code, _, _ := k.do("GET", "/v1/openai/v1/models", tok, nil); code != 200 {
			t.Fatal("warm-up failed")
		}
	}
	type result struct {
		code int
		err  error
	}
	inflight := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest("POST", k.url+"/v1/openai/slow", strings.NewReader(`{}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			inflight <- result{err: err}
			return
		}
		_, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		inflight <- result{code: resp.StatusCode}
	}()
	<-arrived
	stopped := make(chan error, 1)
	go func() { stopped <- k.stop() }()
	// New connections are refused while the in-flight request drains.
	eventually(t, "listener closed", func() bool {
		_, err := http.Get(k.url + "/healthz")
		return err != nil
	})
	select {
	case <-stopped:
		t.Fatal("shutdown finished before the in-flight request")
	default:
	}
	close(release)
	r := <-inflight
	if r.err != nil || r.code != 200 {
		t.Fatalf("in-flight request: %d %v", r.code, r.err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	// Every usage record was written: reopen the database.
	kr, _ := seal.ParseKeyring(testEncKey)
	st, err := sqlstore.Open(context.Background(), "sqlite:"+filepath.Join(k.dir, "keypool.db"), sqlstore.Options{Keyring: kr})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rows, err := st.QueryUsage(context.Background(), store.UsageQuery{GroupBy: []string{"service"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Requests != 4 {
		t.Fatalf("usage rows after shutdown: %+v, want 4 openai requests", rows)
	}
	if !strings.Contains(k.logs.String(), "shutdown complete") {
		t.Error("no shutdown log line")
	}
	k.checkLogs()
}

func TestUsageRecorded(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	tok, ids := setup(t, k, up, nil, keyA)
	if code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"}); code != 200 {
		t.Fatalf("%d %v", code, m)
	}
	var rows []store.UsageRow
	eventually(t, "usage record", func() bool {
		rows, _ = k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{GroupBy: []string{"key", "model", "team", "token"}})
		return len(rows) == 1
	})
	r := rows[0]
	if r.Group["key"] != ids[0] || r.Group["model"] != "gpt-4o-mini" || r.TokensIn != 11 || r.TokensOut != 7 || r.Cost <= 0 {
		t.Errorf("usage row %+v", r)
	}
	if r.Group["team"] == "" || r.Group["token"] == "" {
		t.Errorf("usage row without team or token: %+v", r)
	}
}

func TestRequestTooLarge(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t, func(c *server.Config) { c.MaxBodyBytes = 1024 })
	tok, _ := setup(t, k, up, nil, keyA)
	code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, strings.Repeat("x", 4096))
	if code != 413 || m["error"].(map[string]any)["code"] != "request_too_large" {
		t.Fatalf("%d %v", code, m)
	}
	_ = time.Second
}
