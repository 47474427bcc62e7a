package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/httpx"
)

type principalKey struct{}

// lockedBuffer is a log sink safe for concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type proxyEnv struct {
	pool  *keypool.Pool
	clock *fakeClock
	h     *Handler
	srv   *httptest.Server
	logs  *lockedBuffer
	done  chan Result
	creds chan string
}

// newProxy serves a Handler for the service "svc" at baseURL. Its
// Authorize accepts teamToken only.
func newProxy(t *testing.T, baseURL string, auth keypool.AuthScheme, ids []string, mod func(*Handler)) *proxyEnv {
	t.Helper()
	e := &proxyEnv{clock: newClock(), logs: &lockedBuffer{}, done: make(chan Result, 100), creds: make(chan string, 100)}
	e.pool = newPool(t, e.clock, baseURL, auth, ids...)
	e.h = &Handler{
		Pool: e.pool,
		Authorize: func(r *http.Request, service, cred string) (*http.Request, error) {
			e.creds <- cred
			if cred != teamToken {
				return nil, httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "invalid team token")
			}
			return r.WithContext(context.WithValue(r.Context(), principalKey{}, "team-1")), nil
		},
		OnDone: func(r *http.Request, res Result) { e.done <- res },
		Logger: slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if mod != nil {
		mod(e.h)
	}
	e.srv = httptest.NewServer(e.h)
	t.Cleanup(e.srv.Close)
	return e
}

var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// do sends a request to the proxy with the team token as a bearer token.
func (e *proxyEnv) do(t *testing.T, method, path string, body io.Reader, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+teamToken)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}

func errorCode(t *testing.T, b []byte) string {
	t.Helper()
	var v struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("not a JSON error: %q", b)
	}
	return v.Error.Code
}

func TestHandlerRouting(t *testing.T) {
	up := newUpstream(t, okScript)
	tests := []struct {
		name, base, path, want string
	}{
		{"base path kept", up.URL + "/openai", "/v1/svc/v1/chat/completions", "/openai/v1/chat/completions"},
		{"base with slash", up.URL + "/openai/", "/v1/svc/v1/models", "/openai/v1/models"},
		{"no base path", up.URL, "/v1/svc/v1/models?limit=2&order=desc", "/v1/models?limit=2&order=desc"},
		{"query credential removed", up.URL, "/v1/svc/search?q=go&api_key=" + teamToken, "/search?q=go"},
		{"escapes kept", up.URL, "/v1/svc/files/a%20b%3Ac?x=%2F", "/files/a%20b%3Ac?x=%2F"},
		{"trailing slash", up.URL, "/v1/svc/models/", "/models/"},
		{"service root", up.URL + "/api", "/v1/svc", "/api"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newProxy(t, tt.base, keypool.Bearer, []string{"good"}, nil)
			resp, b := e.do(t, "GET", tt.path, nil)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d %s", resp.StatusCode, b)
			}
			h := up.Hits()
			if got := h[len(h)-1].uri; got != tt.want {
				t.Errorf("upstream got %q, want %q", got, tt.want)
			}
			if resp.Header.Get(HeaderKeyID) != "good" {
				t.Errorf("%s = %q", HeaderKeyID, resp.Header.Get(HeaderKeyID))
			}
		})
	}
}

func TestHandlerRejectsBadTargets(t *testing.T) {
	tests := []struct {
		name, method, target string
		status               int
		code                 string
	}{
		{"dot dot", "GET", "/v1/svc/../admin/keys", 400, "bad_request"},
		{"dot", "GET", "/v1/svc/./x", 400, "bad_request"},
		{"encoded dot dot", "GET", "/v1/svc/%2e%2e/admin", 400, "bad_request"},
		{"encoded dot dot upper", "GET", "/v1/svc/%2E%2E/admin", 400, "bad_request"},
		{"half encoded dot dot", "GET", "/v1/svc/.%2e/admin", 400, "bad_request"},
		{"double encoded dot dot", "GET", "/v1/svc/%252e%252e/admin", 400, "bad_request"},
		{"encoded slash", "GET", "/v1/svc/a%2fb", 400, "bad_request"},
		{"encoded slash upper", "GET", "/v1/svc/a%2Fb", 400, "bad_request"},
		{"double encoded slash", "GET", "/v1/svc/a%252fb", 400, "bad_request"},
		{"encoded backslash", "GET", "/v1/svc/a%5cb", 400, "bad_request"},
		{"backslash", "GET", `/v1/svc/a\b`, 400, "bad_request"},
		{"empty segment", "GET", "/v1/svc//evil.example/x", 400, "bad_request"},
		{"encoded NUL", "GET", "/v1/svc/a%00b", 400, "bad_request"},
		{"encoded newline", "GET", "/v1/svc/a%0d%0aX-Evil:1", 400, "bad_request"},
		{"absolute form", "GET", "http://evil.example/v1/svc/x", 400, "bad_request"},
		{"absolute form same host", "GET", "http://example.com/v1/svc/x", 400, "bad_request"},
		{"asterisk", "OPTIONS", "*", 400, "bad_request"},
		{"connect", "CONNECT", "evil.example:443", 400, "bad_request"},
		{"connect path", "CONNECT", "/v1/svc/x", 400, "bad_request"},
		{"unknown service", "GET", "/v1/nope/x", 404, "unknown_service"},
		{"empty service segment", "GET", "/v1//x", 400, "bad_request"},
		{"no service", "GET", "/v1/", 404, "unknown_service"},
		{"not under v1", "GET", "/admin/keys", 404, "not_found"},
		{"dot dot service", "GET", "/v1/../admin", 400, "bad_request"},
		{"dot dot with parameter", "GET", "/v1/svc/..;x=y/admin", 400, "bad_request"},
		{"dot dot with empty parameter", "GET", "/v1/svc/..;/admin", 400, "bad_request"},
		{"dot with parameter", "GET", "/v1/svc/.;x=y/admin", 400, "bad_request"},
		{"encoded dot dot with parameter", "GET", "/v1/svc/%2e%2e;x=y/admin", 400, "bad_request"},
		{"dot dot with encoded semicolon", "GET", "/v1/svc/..%3bx=y/admin", 400, "bad_request"},
	}
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, tt.target, nil)
			req.Header.Set("Authorization", "Bearer "+teamToken)
			w := httptest.NewRecorder()
			e.h.ServeHTTP(w, req)
			if w.Code != tt.status || errorCode(t, w.Body.Bytes()) != tt.code {
				t.Errorf("got %d %s, want %d %s", w.Code, w.Body, tt.status, tt.code)
			}
			if w.Header().Get("Content-Type") != "application/json" {
				t.Errorf("Content-Type %q", w.Header().Get("Content-Type"))
			}
			res := <-e.done
			if res.Code != tt.code || res.Status != tt.status {
				t.Errorf("OnDone %+v", res)
			}
		})
	}
	if n := len(up.Hits()); n != 0 {
		t.Errorf("%d requests reached the upstream", n)
	}
	if st := keyStats(t, e.pool, "good"); st.Requests != 0 {
		t.Errorf("a key was picked %d times", st.Requests)
	}
}

func TestHandlerCredentials(t *testing.T) {
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	tests := []struct {
		name   string
		query  string
		header map[string]string
		status int
	}{
		{"bearer", "", map[string]string{"Authorization": "Bearer " + teamToken}, 200},
		{"bearer lower case", "", map[string]string{"Authorization": "bearer " + teamToken}, 200},
		{"token", "", map[string]string{"Authorization": "Token " + teamToken}, 200},
		{"raw authorization", "", map[string]string{"Authorization": teamToken}, 200},
		{"x-api-key", "", map[string]string{"X-Api-Key": teamToken}, 200},
		{"xi-api-key", "", map[string]string{"Xi-Api-Key": teamToken}, 200},
		{"x-goog-api-key", "", map[string]string{"X-Goog-Api-Key": teamToken}, 200},
		{"query api_key", "?api_key=" + teamToken, nil, 200},
		{"query key", "?alt=sse&key=" + teamToken, nil, 200},
		{"query api_key encoded name", "?api%5Fkey=" + teamToken, nil, 200},
		{"websocket subprotocol", "", map[string]string{"Sec-WebSocket-Protocol": "chat, token, " + teamToken + ", v2"}, 200},
		{"same token twice", "?key=" + teamToken, map[string]string{"Authorization": "Bearer " + teamToken, "X-Api-Key": teamToken}, 200},
		{"two different credentials", "", map[string]string{"Authorization": "Bearer " + teamToken, "X-Api-Key": "kp_other"}, 400},
		{"two different in query", "?api_key=" + teamToken + "&key=kp_other", nil, 400},
		{"none", "", nil, 401},
		{"wrong", "", map[string]string{"X-Api-Key": "kp_wrong"}, 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(up.Hits())
			req, _ := http.NewRequest("POST", e.srv.URL+"/v1/svc/v1/x"+tt.query, strings.NewReader("{}"))
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d %s, want %d", resp.StatusCode, b, tt.status)
			}
			if strings.Contains(string(b), teamToken) || strings.Contains(string(b), "kp_other") {
				t.Errorf("error echoes a credential: %s", b)
			}
			hits := up.Hits()
			if tt.status != 200 {
				if len(hits) != before {
					t.Errorf("rejected request reached the upstream")
				}
				return
			}
			h := hits[len(hits)-1]
			if h.header.Get("Authorization") != "Bearer "+goodSecret {
				t.Errorf("upstream Authorization %q", h.header.Get("Authorization"))
			}
			for _, name := range []string{"X-Api-Key", "Xi-Api-Key", "X-Goog-Api-Key"} {
				if v := h.header.Get(name); v != "" {
					t.Errorf("upstream got %s: %q", name, v)
				}
			}
			if strings.Contains(h.uri, teamToken) || strings.Contains(fmt.Sprint(h.header), teamToken) {
				t.Errorf("team token reached the upstream: %s %v", h.uri, h.header)
			}
			if tt.name == "websocket subprotocol" && h.header.Get("Sec-WebSocket-Protocol") != "chat, v2" {
				t.Errorf("subprotocols %q, want the others kept", h.header.Get("Sec-WebSocket-Protocol"))
			}
			if tt.name == "query key" && h.uri != "/v1/x?alt=sse" {
				t.Errorf("uri %q", h.uri)
			}
		})
	}
}

func TestCredential(t *testing.T) {
	r := httptest.NewRequest("GET", "/v1/svc/x?monkey=1", nil)
	if c, err := Credential(r); c != "" || err != nil {
		t.Errorf("no credential: %q %v", c, err)
	}
	r.Header.Add("Authorization", "Bearer a")
	r.Header.Add("Authorization", "Bearer b")
	if _, err := Credential(r); err == nil {
		t.Errorf("two Authorization values accepted")
	}
}

func TestHandlerHeaderFiltering(t *testing.T) {
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	removed := map[string]string{
		"Cookie": "session=abc", "Proxy-Authorization": "Basic eDp5", "X-Forwarded-For": "10.0.0.1",
		"X-Forwarded-Host": "evil", "X-Forwarded-Proto": "http", "X-Forwarded-Port": "80", "Forwarded": "for=10.0.0.1",
		"X-Real-Ip": "10.0.0.1", "True-Client-Ip": "10.0.0.1", "Cf-Connecting-Ip": "10.0.0.1", "X-Keypool-Key-Id": "forged",
	}
	kept := map[string]string{
		"OpenAI-Beta": "assistants=v2", "Anthropic-Version": "2023-06-01", "Anthropic-Beta": "x", "Content-Type": "application/json",
		"X-Foo": "bar", "Idempotency-Key": "abc", "X-Stainless-Lang": "go", "User-Agent": "sdk/1.0", "Accept": "text/event-stream",
	}
	var hdr []string
	for k, v := range removed {
		hdr = append(hdr, k, v)
	}
	for k, v := range kept {
		hdr = append(hdr, k, v)
	}
	resp, b := e.do(t, "POST", "/v1/svc/x", strings.NewReader("{}"), hdr...)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d %s", resp.StatusCode, b)
	}
	got := up.Hits()[0].header
	for k := range removed {
		if v, ok := got[http.CanonicalHeaderKey(k)]; ok {
			t.Errorf("%s reached the upstream: %q", k, v)
		}
	}
	for k, v := range kept {
		if got.Get(k) != v {
			t.Errorf("%s = %q, want %q passed through", k, got.Get(k), v)
		}
	}
}

func TestHandlerProxyHeadersReplaceClients(t *testing.T) {
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.XAPIKey, []string{"good"}, nil)
	svc, _ := e.pool.Service("svc")
	svc.Headers = map[string]string{"Cartesia-Version": "2024-06-10"}
	st, _ := e.pool.Stats("svc")
	_ = st
	e.pool.SetService(svc, []keypool.Key{{ID: "good", Secret: goodSecret}})
	e.do(t, "GET", "/v1/svc/x", nil, "Cartesia-Version", "1999-01-01")
	h := up.Hits()[0].header
	if v := h.Values("Cartesia-Version"); len(v) != 1 || v[0] != "2024-06-10" {
		t.Errorf("Cartesia-Version %q", v)
	}
	if h.Get("X-Api-Key") != goodSecret || h.Get("Authorization") != "" {
		t.Errorf("key headers: x-api-key %q authorization %q", h.Get("X-Api-Key"), h.Get("Authorization"))
	}
}

func TestHandlerAuthorize(t *testing.T) {
	up := newUpstream(t, okScript)
	t.Run("httpx error written as is", func(t *testing.T) {
		e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
		req, _ := http.NewRequest("GET", e.srv.URL+"/v1/svc/x", nil)
		req.Header.Set("X-Api-Key", "kp_wrong")
		resp, _ := http.DefaultClient.Do(req)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 401 || errorCode(t, b) != "invalid_token" {
			t.Errorf("got %d %s", resp.StatusCode, b)
		}
		if got := <-e.creds; got != "kp_wrong" {
			t.Errorf("Authorize got %q", got)
		}
	})
	t.Run("unknown service needs a token first", func(t *testing.T) {
		e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
		resp, _ := http.Get(e.srv.URL + "/v1/nope/x")
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("status %d, want 401 before revealing the service is unknown", resp.StatusCode)
		}
	})
	t.Run("other error is 500", func(t *testing.T) {
		e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, func(h *Handler) {
			h.Authorize = func(r *http.Request, service, cred string) (*http.Request, error) {
				return nil, errors.New("database down at 10.1.2.3")
			}
		})
		resp, b := e.do(t, "GET", "/v1/svc/x", nil)
		if resp.StatusCode != 500 || errorCode(t, b) != "internal_error" || strings.Contains(string(b), "10.1.2.3") {
			t.Errorf("got %d %s", resp.StatusCode, b)
		}
	})
	t.Run("principal reaches ModifyResponse and OnDone", func(t *testing.T) {
		seen := make(chan any, 2)
		e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, func(h *Handler) {
			h.ModifyResponse = func(resp *http.Response) error {
				seen <- resp.Request.Context().Value(principalKey{})
				return nil
			}
			h.OnDone = func(r *http.Request, res Result) { seen <- r.Context().Value(principalKey{}) }
		})
		e.do(t, "GET", "/v1/svc/x", nil)
		for range 2 {
			if p := waitFor(t, seen, "hooks"); p != "team-1" {
				t.Errorf("principal %v", p)
			}
		}
	})
	if n := len(up.Hits()); n != 1 {
		t.Errorf("%d upstream hits, want 1", n)
	}
}

func TestHandlerBodyLimit(t *testing.T) {
	up := newUpstream(t, okScript)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, func(h *Handler) { h.MaxBodyBytes = 1000 })
	tests := []struct {
		name   string
		body   io.Reader
		status int
	}{
		{"content-length over", bytes.NewReader(make([]byte, 1001)), 413},
		{"chunked over", io.MultiReader(strings.NewReader(strings.Repeat("x", 600)), strings.NewReader(strings.Repeat("y", 600))), 413},
		{"at the limit", bytes.NewReader(make([]byte, 1000)), 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, b := e.do(t, "POST", "/v1/svc/upload", tt.body)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d %s", resp.StatusCode, b)
			}
			if tt.status == 413 && errorCode(t, b) != "request_too_large" {
				t.Errorf("code %s", b)
			}
		})
	}
	if st := keyStats(t, e.pool, "good"); st.Requests != 1 {
		t.Errorf("key picked %d times, want only for the request within the limit", st.Requests)
	}
}

func TestHandlerFailover(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef\x00\xff"), 5000)
	for _, fs := range failScripts {
		t.Run(fs.name, func(t *testing.T) {
			var clock *fakeClock
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
				if key == "bad" {
					fs.fail(w, clock.Now())
					return
				}
				okScript(w, r, key, n)
			})
			e := newProxy(t, up.URL, keypool.Bearer, nil, nil)
			clock = e.clock
			resp, b := e.do(t, "POST", "/v1/svc/v1/chat/completions", bytes.NewReader(payload), "Content-Type", "application/octet-stream")
			if resp.StatusCode != 200 || string(b) != "ok good" || resp.Header.Get(HeaderKeyID) != "good" {
				t.Fatalf("got %d %q key %q", resp.StatusCode, b, resp.Header.Get(HeaderKeyID))
			}
			for _, h := range up.Hits() {
				if !bytes.Equal(h.body, payload) {
					t.Errorf("key %s got a %d-byte body, want the %d bytes sent", h.key, len(h.body), len(payload))
				}
			}
			res := waitFor(t, e.done, "OnDone")
			if res.Attempts != 2 || res.KeyID != "good" || res.Status != 200 || res.BytesIn != int64(len(payload)) || res.BytesOut != 7 || res.Code != "" {
				t.Errorf("result %+v", res)
			}
		})
	}
}

func TestHandlerErrors(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		switch r.URL.Path {
		case "/slow":
			select {
			case <-release:
			case <-r.Context().Done():
			}
		case "/400":
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("X-Request-Id", "req_1")
			w.WriteHeader(400)
			io.WriteString(w, `{"error":{"message":"model not found","type":"invalid_request_error","code":null}}`)
		case "/redirect":
			http.Redirect(w, r, "https://elsewhere.example/path?x=1", http.StatusTemporaryRedirect)
		default:
			okScript(w, r, key, n)
		}
	})
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()

	tests := []struct {
		name    string
		base    string
		path    string
		prepare func(e *proxyEnv)
		status  int
		code    string // "" for the upstream's own answer
		body    string
	}{
		{name: "no key", base: up.URL, path: "/x", status: 429, code: "no_key_available", prepare: func(e *proxyEnv) {
			e.pool.SetKeyState("svc", "bad", keypool.StateCooling, e.clock.Now().Add(90*time.Second), "test")
			e.pool.SetKeyState("svc", "good", keypool.StateInvalid, time.Time{}, "test")
		}},
		{name: "unreachable", base: dead.URL, path: "/x", status: 502, code: "upstream_unreachable"},
		{name: "timeout", base: up.URL, path: "/slow", status: 504, code: "upstream_timeout", prepare: func(e *proxyEnv) {
			e.h.Transport = &Transport{AttemptTimeout: 50 * time.Millisecond}
		}},
		{name: "upstream 400 passes through", base: up.URL, path: "/400", status: 400,
			body: `{"error":{"message":"model not found","type":"invalid_request_error","code":null}}`},
		{name: "redirect returned", base: up.URL, path: "/redirect", status: 307},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var e *proxyEnv
			e = newProxy(t, tt.base, keypool.Bearer, nil, func(h *Handler) {})
			if tt.prepare != nil {
				tt.prepare(e)
			}
			resp, b := e.do(t, "POST", "/v1/svc"+tt.path, strings.NewReader("{}"))
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d %s, want %d", resp.StatusCode, b, tt.status)
			}
			res := waitFor(t, e.done, "OnDone")
			if res.Code != tt.code {
				t.Errorf("Result.Code %q, want %q", res.Code, tt.code)
			}
			if tt.code != "" {
				if c := errorCode(t, b); c != tt.code {
					t.Errorf("code %q, want %q", c, tt.code)
				}
			}
			if tt.body != "" && string(b) != tt.body {
				t.Errorf("body %q, want the upstream's", b)
			}
			switch tt.name {
			case "no key":
				if resp.Header.Get("Retry-After") != "90" {
					t.Errorf("Retry-After %q, want 90", resp.Header.Get("Retry-After"))
				}
			case "upstream 400 passes through":
				if resp.Header.Get("X-Request-Id") != "req_1" || resp.Header.Get(HeaderKeyID) != "bad" {
					t.Errorf("headers %v", resp.Header)
				}
			case "redirect returned":
				if resp.Header.Get("Location") != "https://elsewhere.example/path?x=1" {
					t.Errorf("Location %q", resp.Header.Get("Location"))
				}
			case "unreachable", "timeout":
				if resp.Header.Get(HeaderKeyID) != "good" || res.Attempts != 2 {
					t.Errorf("key id %q attempts %d", resp.Header.Get(HeaderKeyID), res.Attempts)
				}
			}
		})
	}
}

func TestHandlerScrubsSecret(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("X-Debug", "auth=Bearer "+goodSecret)
		w.WriteHeader(422)
		fmt.Fprintf(w, `{"error":{"message":"key %s cannot do that"}}`, goodSecret)
	})
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	resp, b := e.do(t, "POST", "/v1/svc/x", strings.NewReader("{}"))
	if resp.StatusCode != 422 || strings.Contains(string(b), goodSecret) || !strings.Contains(string(b), Redacted) {
		t.Errorf("body %d %s", resp.StatusCode, b)
	}
	if strings.Contains(fmt.Sprint(resp.Header), goodSecret) || resp.Header.Get("X-Debug") != "auth=Bearer "+Redacted {
		t.Errorf("headers %v", resp.Header)
	}
}

func TestHandlerSSE(t *testing.T) {
	sent := make(chan time.Time, 1)
	finish := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		io.WriteString(w, "data: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		sent <- time.Now()
		select { // hold the stream open until the client has the first event
		case <-finish:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: [DONE]\n\n")
	})
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, nil)
	req, _ := http.NewRequest("POST", e.srv.URL+"/v1/svc/v1/chat/completions", strings.NewReader(`{"stream":true}`))
	req.Header.Set("Authorization", "Bearer "+teamToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := make(chan string, 1)
	br := bufio.NewReader(resp.Body)
	go func() {
		line, _ := br.ReadString('\n')
		got <- line
	}()
	line := waitFor(t, got, "the first event while the upstream holds the stream")
	at := waitFor(t, sent, "the upstream's send time")
	if line != "data: {\"n\":1}\n" {
		t.Errorf("first line %q", line)
	}
	if d := time.Since(at); d > time.Second {
		t.Errorf("first event took %s to arrive", d)
	}
	t.Logf("first event arrived %s after the upstream flushed it", time.Since(at))
	if st := keyStats(t, e.pool, "good"); st.InFlight != 1 {
		t.Errorf("in flight while streaming %d", st.InFlight)
	}
	close(finish)
	rest, _ := io.ReadAll(br)
	if string(rest) != "\ndata: [DONE]\n\n" {
		t.Errorf("rest %q", rest)
	}
	waitFor(t, e.done, "OnDone")
	if st := keyStats(t, e.pool, "good"); st.InFlight != 0 {
		t.Errorf("in flight after the stream %d", st.InFlight)
	}
}

func TestHandlerWebSocket(t *testing.T) {
	type seen struct {
		auth, proto, upgrade string
	}
	seenc := make(chan seen, 1)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seenc <- seen{r.Header.Get("Authorization"), r.Header.Get("Sec-WebSocket-Protocol"), r.Header.Get("Upgrade")}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: chat\r\n\r\n")
		brw.Flush()
		io.Copy(conn, brw) // echo until the client closes
	}))
	defer upstream.Close()
	e := newProxy(t, upstream.URL, keypool.Bearer, []string{"good"}, nil)

	conn, err := net.Dial("tcp", e.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req, _ := http.NewRequest("GET", e.srv.URL+"/v1/svc/v1/realtime?model=x", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Protocol", "token, "+teamToken+", chat")
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 || resp.Header.Get(HeaderKeyID) != "good" || resp.Header.Get("Sec-WebSocket-Protocol") != "chat" {
		t.Fatalf("upgrade answer %d %v", resp.StatusCode, resp.Header)
	}
	s := waitFor(t, seenc, "the upstream upgrade")
	if s.auth != "Bearer "+goodSecret || s.proto != "chat" || !strings.EqualFold(s.upgrade, "websocket") {
		t.Errorf("upstream saw %+v", s)
	}
	for _, msg := range []string{"ping\n", "second frame\n"} {
		conn.Write([]byte(msg))
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
			t.Fatalf("echo %q, %v", got, err)
		}
	}
	if st := keyStats(t, e.pool, "good"); st.InFlight != 1 {
		t.Errorf("in flight while the socket is open: %d", st.InFlight)
	}
	conn.Close()
	res := waitFor(t, e.done, "OnDone")
	if res.Status != 101 || res.KeyID != "good" {
		t.Errorf("result %+v", res)
	}
	if st := keyStats(t, e.pool, "good"); st.InFlight != 0 || st.State != keypool.StateActive {
		t.Errorf("after close: %+v", st)
	}
}

func TestHandlerClientDisconnect(t *testing.T) {
	arrived := make(chan struct{}, 1)
	canceled := make(chan struct{}, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		arrived <- struct{}{}
		<-r.Context().Done()
		canceled <- struct{}{}
	})
	e := newProxy(t, up.URL, keypool.Bearer, nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/v1/svc/slow", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+teamToken)
	errc := make(chan error, 1)
	go func() {
		_, err := http.DefaultClient.Do(req)
		errc <- err
	}()
	waitFor(t, arrived, "the upstream request")
	cancel()
	waitFor(t, errc, "the client")
	waitFor(t, canceled, "the upstream request to be canceled")
	res := waitFor(t, e.done, "OnDone")
	if res.Status != 499 || res.Code != "canceled" || res.Attempts != 1 {
		t.Errorf("result %+v", res)
	}
	for _, id := range []string{"bad", "good"} {
		st := keyStats(t, e.pool, id)
		if st.State != keypool.StateActive || st.Failures != 0 || st.InFlight != 0 {
			t.Errorf("key %s after disconnect: %+v", id, st)
		}
	}
	if n := len(up.Hits()); n != 1 {
		t.Errorf("%d upstream hits, want 1 (no retry)", n)
	}
}

// TestHandlerNoSecretLeaks drives failure paths and greps everything a
// client, a log or an error could show for the keys and the team token.
func TestHandlerNoSecretLeaks(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		secret := map[string]string{"bad": badSecret, "good": goodSecret}[key]
		w.Header().Set("X-Echo", secret)
		switch r.URL.Path {
		case "/401":
			w.WriteHeader(401)
			fmt.Fprintf(w, `{"error":"invalid key %s"}`, secret)
		case "/slow":
			select {
			case <-release:
			case <-r.Context().Done():
			}
		case "/reset":
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.Close()
		default:
			fmt.Fprintf(w, "fine")
		}
	})
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	var seen []string
	for _, scheme := range []keypool.AuthScheme{keypool.Bearer, keypool.QueryParam} {
		for _, base := range []string{up.URL, dead.URL} {
			for _, path := range []string{"/401", "/slow", "/reset", "/ok"} {
				e := newProxy(t, base, scheme, nil, func(h *Handler) {
					h.Transport = &Transport{AttemptTimeout: 30 * time.Millisecond}
				})
				resp, b := e.do(t, "GET", "/v1/svc"+path+"?api_key="+teamToken, nil)
				res := waitFor(t, e.done, "OnDone")
				seen = append(seen, string(b), fmt.Sprint(resp.Header), e.logs.String(), fmt.Sprintf("%v %+v", res.Err, res))
			}
		}
	}
	// Transport errors, directly.
	pool := newPool(t, newClock(), dead.URL, keypool.QueryParam)
	_, err := (&http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}).Get(dead.URL + "/x")
	seen = append(seen, fmt.Sprintf("%v %+v", err, err))
	all := strings.Join(seen, "\n")
	for _, s := range []string{badSecret, goodSecret, teamToken} {
		if strings.Contains(all, s) {
			i := strings.Index(all, s)
			t.Errorf("%s leaked: …%s…", s, all[max(0, i-200):min(len(all), i+50)])
		}
	}
	if !strings.Contains(all, "upstream_unreachable") || !strings.Contains(all, "upstream_timeout") {
		t.Errorf("the scenarios did not run as intended")
	}
}

func TestResponseWriterFlushesAndUnwrapsToTheWriterItWraps(t *testing.T) {
	w := httptest.NewRecorder()
	rec := &ResponseWriter{ResponseWriter: w}
	if http.NewResponseController(rec).Flush() != nil || !w.Flushed {
		t.Errorf("flush did not reach the underlying writer")
	}
	if rec.Unwrap() != w {
		t.Errorf("Unwrap")
	}
	if _, err := rec.Write([]byte("abc")); err != nil || rec.Status() != 200 || rec.BytesWritten() != 3 {
		t.Errorf("status %d, bytes %d after a write of 3", rec.Status(), rec.BytesWritten())
	}
}
