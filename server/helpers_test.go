package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/server"
)

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer = testutil.SyncBuffer

const testEncKey = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

// kp is a keypoold under test, serving on a loopback port.
type kp struct {
	t      *testing.T
	srv    *server.Server
	url    string
	admin  string
	logs   *syncBuffer
	out    *syncBuffer
	dir    string
	cancel context.CancelFunc
	done   chan error
	// secrets collects every key value and token used, for the
	// no-secret-in-logs and no-secret-in-metrics checks.
	secrets []string
}

type kpOption func(*server.Config)

// startKP starts keypoold on a temp SQLite database. It is shut down at
// the end of the test (if the test did not already).
func startKP(t *testing.T, opts ...kpOption) *kp {
	t.Helper()
	dir := t.TempDir()
	k := &kp{t: t, logs: &syncBuffer{}, out: &syncBuffer{}, dir: dir, admin: "kpadm_test_admin_token_0123456789abcdef"}
	cfg := server.Config{
		Database:      server.SecretURL("sqlite:" + filepath.Join(dir, "keypool.db")),
		AdminToken:    keypool.Secret(k.admin),
		EncryptionKey: testEncKey,
		LogOutput:     k.logs,
		LogLevel:      "debug",
		Output:        k.out,
		DrainTimeout:  server.Duration(5 * time.Second),
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.DataDir == "" && !strings.HasPrefix(cfg.Database.Reveal(), "sqlite:") {
		// Generated files (the first admin password, the journal) stay in
		// the test's directory, not in ./data of the package.
		cfg.DataDir = dir
	}
	k.secrets = append(k.secrets, k.admin)
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatalf("server.New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	k.srv, k.url, k.cancel, k.done = srv, "http://"+ln.Addr().String(), cancel, make(chan error, 1)
	go func() { k.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { k.stop() })
	return k
}

// stop shuts keypoold down and returns Serve's result.
func (k *kp) stop() error {
	k.cancel()
	select {
	case err := <-k.done:
		k.done <- err
		return err
	case <-time.After(30 * time.Second):
		k.t.Error("keypoold did not shut down within 30s")
		return nil
	}
}

// do sends a request and returns the status, the decoded JSON body (nil
// when not JSON) and the response.
func (k *kp) do(method, path, token string, body any) (int, map[string]any, *http.Response) {
	k.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, k.url+path, rd)
	if err != nil {
		k.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	_ = json.Unmarshal(raw, &m)
	if m == nil {
		m = map[string]any{"_raw": string(raw)}
	}
	return resp.StatusCode, m, resp
}

// mustAdmin calls the admin API and fails unless the status is want.
func (k *kp) mustAdmin(method, path string, body any, want int) map[string]any {
	k.t.Helper()
	code, m, _ := k.do(method, path, k.admin, body)
	if code != want {
		k.t.Fatalf("%s %s = %d %v, want %d", method, path, code, m, want)
	}
	return m
}

// addService creates a service.
func (k *kp) addService(name, baseURL, scheme string, extra map[string]any) {
	k.t.Helper()
	body := map[string]any{"name": name, "base_url": baseURL, "auth_scheme": scheme}
	for n, v := range extra {
		body[n] = v
	}
	k.mustAdmin("POST", "/admin/services", body, http.StatusCreated)
}

// addKey adds a key and returns its id.
func (k *kp) addKey(service, value string, extra map[string]any) string {
	k.t.Helper()
	body := map[string]any{"service": service, "key_value": value}
	for n, v := range extra {
		body[n] = v
	}
	m := k.mustAdmin("POST", "/admin/keys", body, http.StatusCreated)
	k.secrets = append(k.secrets, value)
	id, _ := m["id"].(string)
	if id == "" {
		k.t.Fatalf("key created without id: %v", m)
	}
	return id
}

// addTeam creates a team and returns its id.
func (k *kp) addTeam(name string, extra map[string]any) string {
	k.t.Helper()
	body := map[string]any{"name": name}
	for n, v := range extra {
		body[n] = v
	}
	m := k.mustAdmin("POST", "/admin/teams", body, http.StatusCreated)
	return m["id"].(string)
}

// addToken creates a token for a team and returns its plaintext.
func (k *kp) addToken(teamID string, extra map[string]any) string {
	k.t.Helper()
	body := map[string]any{"name": "test", "team_id": teamID}
	for n, v := range extra {
		body[n] = v
	}
	m := k.mustAdmin("POST", "/admin/tokens", body, http.StatusCreated)
	tok, _ := m["token"].(string)
	if tok == "" {
		k.t.Fatalf("token created without token: %v", m)
	}
	k.secrets = append(k.secrets, tok)
	return tok
}

// checkNoSecrets fails when text contains any secret used in the test.
func (k *kp) checkNoSecrets(what, text string) {
	k.t.Helper()
	for _, s := range k.secrets {
		if s != "" && strings.Contains(text, s) {
			k.t.Errorf("%s contains a secret (%s…)", what, s[:min(6, len(s))])
		}
	}
}

// checkLogs stops keypoold (so that every buffered line is written) and
// fails when its logs contain any secret used in the test.
func (k *kp) checkLogs() {
	k.t.Helper()
	if err := k.stop(); err != nil {
		k.t.Errorf("shutdown: %v", err)
	}
	logs := k.logs.String()
	if !strings.Contains(logs, "shutdown complete") {
		k.t.Error("logs are incomplete")
	}
	k.checkNoSecrets("logs", logs)
}

// upstream is a scripted local upstream that records what it received.
type upstream struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []seen
}

type seen struct {
	Method, Path, RawQuery string
	Header                 http.Header
	Body                   string
}

func newUpstream(t *testing.T, h func(w http.ResponseWriter, r *http.Request)) *upstream {
	t.Helper()
	u := &upstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.reqs = append(u.reqs, seen{r.Method, r.URL.Path, r.URL.RawQuery, r.Header.Clone(), string(b)})
		u.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(b))
		h(w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) seen() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seen(nil), u.reqs...)
}

func (u *upstream) last() seen {
	s := u.seen()
	if len(s) == 0 {
		return seen{}
	}
	return s[len(s)-1]
}

// okJSON answers a small OpenAI-style chat completion.
func okJSON(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}`)
}

// bearerKey returns the key an upstream request carried in Authorization.
func bearerKey(h http.Header) string {
	return strings.TrimPrefix(h.Get("Authorization"), "Bearer ")
}

// eventually polls cond every 10ms for up to 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logCount returns how often substr occurs in the logs once they are
// written: keypoold buffers its log lines for up to 100 ms, so it waits
// (at most 2 s) for want occurrences, then one more flush for any extra.
func (k *kp) logCount(substr string, want int) int {
	k.t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for strings.Count(k.logs.String(), substr) < want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	return strings.Count(k.logs.String(), substr)
}
