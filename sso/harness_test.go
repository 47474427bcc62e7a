package sso_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/oidctest"
	"github.com/keypool/keypool/server"
)

const (
	adminToken   = "kpadm_sso_test_admin_token_0123456789abcdef"
	clientID     = "keypool-test-client"
	clientSecret = "client-secret-NEVER-LOGGED-42"
)

// lockedBuffer collects log lines from the server's goroutines.
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

// env is a keypoold with OIDC sign-in against a test provider, and an
// upstream the proxy forwards to.
type env struct {
	t        *testing.T
	base     string
	provider *oidctest.Provider
	logs     *lockedBuffer
	offset   atomic.Int64 // added to the wall clock, in nanoseconds
	upstream *httptest.Server
}

func start(t *testing.T, mod func(*server.OIDCConfig)) *env {
	t.Helper()
	e := &env{t: t, logs: &lockedBuffer{}}
	e.provider = oidctest.New(t.Cleanup, clientID, clientSecret)
	e.provider.SetAutoApprove(true)
	e.upstream = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}`)
	}))
	t.Cleanup(e.upstream.Close)
	// The listener comes first: the base URL is part of the configuration.
	hs := httptest.NewUnstartedServer(nil)
	e.base = "http://" + hs.Listener.Addr().String()
	oc := server.OIDCConfig{Issuer: e.provider.URL(), ClientID: clientID, ClientSecret: keypool.Secret(clientSecret),
		BaseURL: e.base, AllowedDomains: []string{"example.com"}, Admins: []string{"root@example.com"}}
	if mod != nil {
		mod(&oc)
	}
	dir := t.TempDir()
	srv, err := server.New(context.Background(), server.Config{
		Database: server.SecretURL("sqlite:" + filepath.Join(dir, "k.db")), DataDir: dir,
		AdminToken: keypool.Secret(adminToken), EncryptionKey: keypool.Secret(strings.Repeat("ab", 32)),
		LogOutput: e.logs, LogLevel: "debug", Output: io.Discard,
		Console: server.ConsoleConfig{Password: auth.PasswordParams{MemoryKiB: 1024, Time: 1, Threads: 1}},
		OIDC:    oc,
		Now:     func() time.Time { return time.Now().Add(time.Duration(e.offset.Load())) },
	})
	if err != nil {
		t.Fatal(err)
	}
	hs.Config.Handler = srv.Handler()
	hs.Start()
	t.Cleanup(func() {
		hs.Close()
		_ = srv.Shutdown(context.Background())
	})
	if st, _ := e.admin("POST", "/admin/services", map[string]any{"name": "openai", "base_url": e.upstream.URL, "auth_scheme": "bearer"}); st != http.StatusCreated {
		t.Fatalf("create service: %d", st)
	}
	if st, _ := e.admin("POST", "/admin/keys", map[string]any{"service": "openai", "key_value": "sk-upstream-secret-1"}); st != http.StatusCreated {
		t.Fatalf("create key: %d", st)
	}
	return e
}

// browser is a cookie-keeping client that does not follow redirects.
func browser() *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{Jar: jar, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

func (e *env) get(c *http.Client, u string) (*http.Response, string) {
	e.t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func (e *env) post(c *http.Client, path string) (*http.Response, string) {
	e.t.Helper()
	req, _ := http.NewRequest("POST", e.base+path, strings.NewReader(""))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", e.base)
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// begin runs /auth/login and the (auto-approving) provider, and returns
// the callback URL the provider sent the browser to.
func (e *env) begin(c *http.Client, path string) string {
	e.t.Helper()
	resp, body := e.get(c, e.base+path)
	if resp.StatusCode != http.StatusFound {
		e.t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
	}
	authz := resp.Header.Get("Location")
	if !strings.HasPrefix(authz, e.provider.URL()+"/authorize?") {
		e.t.Fatalf("login redirects to %q", authz)
	}
	q := mustURL(e.t, authz).Query()
	if q.Get("code_challenge_method") != "S256" || q.Get("nonce") == "" || q.Get("state") == "" {
		e.t.Fatalf("authorization request lacks PKCE, nonce or state: %v", q)
	}
	resp, body = e.get(c, authz)
	if resp.StatusCode != http.StatusFound {
		e.t.Fatalf("provider: %d %s", resp.StatusCode, body)
	}
	return resp.Header.Get("Location")
}

var tokenRe = regexp.MustCompile(`<code id="token">(kp_[A-Za-z0-9]+)</code>`)

// signIn signs in and returns the token shown once.
func (e *env) signIn(c *http.Client) string {
	e.t.Helper()
	cb := e.begin(c, "/auth/login")
	resp, body := e.get(c, cb)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/auth/token" {
		e.t.Fatalf("callback: %d %q %s", resp.StatusCode, resp.Header.Get("Location"), body)
	}
	resp, body = e.get(c, e.base+"/auth/token")
	m := tokenRe.FindStringSubmatch(body)
	if resp.StatusCode != http.StatusOK || m == nil {
		e.t.Fatalf("token page: %d %s", resp.StatusCode, body)
	}
	return m[1]
}

func (e *env) admin(method, path string, body any) (int, map[string]any) {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, e.base+path, rd)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// counts returns how many users, tokens and teams exist.
func (e *env) counts() (users, tokens, teams int) {
	e.t.Helper()
	_, u := e.admin("GET", "/admin/users", nil)
	_, tk := e.admin("GET", "/admin/tokens", nil)
	_, tm := e.admin("GET", "/admin/teams", nil)
	n := func(m map[string]any, k string) int { l, _ := m[k].([]any); return len(l) }
	return n(u, "users"), n(tk, "tokens"), n(tm, "teams")
}

// proxied calls the upstream through the proxy with token.
func (e *env) proxied(token string) int {
	e.t.Helper()
	req, _ := http.NewRequest("POST", e.base+"/v1/openai/v1/chat/completions", strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// audit returns the audit log as text.
func (e *env) audit() string {
	e.t.Helper()
	_, m := e.admin("GET", "/admin/audit?limit=1000", nil)
	b, _ := json.Marshal(m)
	return string(b)
}

// noSecrets fails if any of secrets shows up in the logs or the audit log.
func (e *env) noSecrets(secrets ...string) {
	e.t.Helper()
	logs, audit := e.logs.String(), e.audit()
	for _, s := range append(secrets, clientSecret) {
		if s == "" {
			continue
		}
		if strings.Contains(logs, s) {
			e.t.Errorf("a secret (%.12s…) is in the logs", s)
		}
		if strings.Contains(audit, s) {
			e.t.Errorf("a secret (%.12s…) is in the audit log", s)
		}
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func oidcClaims(email string) oidctest.Claims {
	return oidctest.Claims{Email: email, EmailVerified: true}
}

// googleVars configures sign-in the way the README's Google setup does:
// from the environment, with GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET and
// AUTH_BASE_URL, and KEYPOOL_OIDC_ISSUER pointing them at the test
// provider (Google's issuer is fixed). extra adds more variables.
func googleVars(t *testing.T, extra map[string]string) func(*server.OIDCConfig) {
	return func(oc *server.OIDCConfig) {
		vars := map[string]string{"GOOGLE_CLIENT_ID": clientID, "GOOGLE_CLIENT_SECRET": clientSecret, "AUTH_BASE_URL": oc.BaseURL,
			"KEYPOOL_OIDC_ISSUER": oc.Issuer}
		for k, v := range extra {
			vars[k] = v
		}
		var cfg server.Config
		if err := cfg.ApplyEnv(func(k string) (string, bool) { v, ok := vars[k]; return v, ok }); err != nil {
			t.Fatal(err)
		}
		*oc = cfg.OIDC
	}
}
