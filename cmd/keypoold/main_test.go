package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/server"
)

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer = testutil.SyncBuffer

func mapEnv(m map[string]string) env {
	return env{lookup: func(k string) (string, bool) { v, ok := m[k]; return v, ok }}
}

func TestLoadConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "keypool.yaml")
	yaml := `
listen: ":7000"
log_level: debug
log_format: text
database: sqlite:/from/file.db
services:
  - name: openai
    base_url: https://api.openai.com
    keys:
      - key_value: ${OPENAI_KEY}
`
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	base := map[string]string{
		"KEYPOOL_CONFIG":   file,
		"OPENAI_KEY":       "sk-env-secret-value-123",
		"KEYPOOL_LISTEN":   ":7001",
		"KEYPOOL_DATABASE": "postgres://k:pw@db/keypool",
	}
	cases := []struct {
		name       string
		env        map[string]string
		args       []string
		listen, db string
		level      string
		wantErr    string
	}{
		{"file then env", base, nil, ":7001", "postgres://k:pw@db/keypool", "debug", ""},
		{"flags win", base, []string{"-listen", ":7002", "--log-level", "warn"}, ":7002", "postgres://k:pw@db/keypool", "warn", ""},
		{"file only", map[string]string{"OPENAI_KEY": "x"}, []string{"-config", file}, ":7000", "sqlite:/from/file.db", "debug", ""},
		{"nothing", map[string]string{}, nil, "", "", "", ""},
		{"unset secret", map[string]string{"KEYPOOL_CONFIG": file}, nil, "", "", "", "OPENAI_KEY is not set"},
		{"bad level", map[string]string{"KEYPOOL_LOG_LEVEL": "loud"}, nil, "", "", "", "log level"},
		{"stray argument", map[string]string{}, []string{"extra"}, "", "", "", "unexpected argument"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := loadConfig(tc.args, mapEnv(tc.env), io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Listen != tc.listen || cfg.Database.Reveal() != tc.db || cfg.LogLevel != tc.level {
				t.Errorf("listen %q db %q level %q", cfg.Listen, cfg.Database.Reveal(), cfg.LogLevel)
			}
		})
	}
	cfg, _ := loadConfig(nil, mapEnv(base), io.Discard)
	if len(cfg.Services) != 1 || cfg.Services[0].Keys[0].KeyValue.Reveal() != "sk-env-secret-value-123" {
		t.Errorf("services from the file: %+v", cfg.Services)
	}
	if strings.Contains(strings.Join([]string{cfg.Database.String()}, ""), "pw") {
		t.Error("database password printed")
	}
}

// startServe runs "keypoold serve" in dir until the test ends and returns
// its base URL and output buffers.
func startServe(t *testing.T, dir string, e map[string]string) (url string, stdout, stderr *syncBuffer, stop func() int) {
	t.Helper()
	stdout, stderr = &syncBuffer{}, &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, []string{"serve", "-listen", "127.0.0.1:0", "-log-format", "text"}, mapEnv(e), strings.NewReader(""), stdout, stderr)
	}()
	re := regexp.MustCompile(`msg=listening addr=(\S+)`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if m := re.FindStringSubmatch(stderr.String()); m != nil {
			url = "http://" + m[1]
			break
		}
		select {
		case c := <-code:
			t.Fatalf("serve exited with %d: %s", c, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not start: %s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	var once sync.Once
	result := 0
	stop = func() int {
		once.Do(func() { cancel(); result = <-code })
		return result
	}
	t.Cleanup(func() { stop() })
	return url, stdout, stderr, stop
}

func TestZeroConfigServe(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	url, stdout, stderr, stop := startServe(t, dir, map[string]string{})
	resp, err := http.Get(url + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	tokenFile, err := os.ReadFile(filepath.Join(dir, "data", server.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(string(tokenFile))
	if strings.Count(stdout.String(), tok) != 1 {
		t.Errorf("admin token printed %d times on first start", strings.Count(stdout.String(), tok))
	}
	if strings.Contains(stderr.String(), tok) {
		t.Error("admin token in the logs")
	}
	if !strings.Contains(stdout.String(), "WARNING") {
		t.Error("no warning about the generated encryption key")
	}
	if c := stop(); c != 0 {
		t.Fatalf("exit code %d", c)
	}
	if _, err := os.Stat(filepath.Join(dir, "data", "keypool.db")); err != nil {
		t.Error(err)
	}

	_, stdout2, _, stop2 := startServe(t, dir, map[string]string{})
	if strings.Contains(stdout2.String(), tok) {
		t.Error("admin token printed again on the second start")
	}
	if c := stop2(); c != 0 {
		t.Fatalf("second exit code %d", c)
	}
}

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	upstream := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"key":"`+r.Header.Get("Authorization")+`"}`)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go upstream.Serve(ln)
	defer upstream.Close()

	admin := "kpadm_cli_test_token_abcdefghijklmnop"
	url, _, _, _ := startServe(t, dir, map[string]string{
		"KEYPOOL_ADMIN_TOKEN":    admin,
		"KEYPOOL_ENCRYPTION_KEY": strings.Repeat("ab", 32),
		"KEYPOOL_DATABASE":       "sqlite:" + filepath.Join(dir, "k.db"),
	})
	e := map[string]string{"KEYPOOL_URL": url, "KEYPOOL_ADMIN_TOKEN": admin}
	cli := func(stdin string, args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		if c := run(context.Background(), args, mapEnv(e), strings.NewReader(stdin), &out, &errb); c != 0 {
			t.Fatalf("keypoold %s: exit %d: %s%s", strings.Join(args, " "), c, errb.String(), out.String())
		}
		return out.String()
	}
	cli("", "service", "add", "--name", "openai", "--base-url", "http://"+ln.Addr().String(), "--auth-scheme", "bearer", "--header", "OpenAI-Beta=x")
	out := cli("sk-cli-key-from-stdin-000001\n", "key", "add", "--service", "openai")
	if !strings.Contains(out, "added key") || strings.Contains(out, "sk-cli-key-from-stdin-000001") {
		t.Errorf("key add: %q", out)
	}
	out = cli("sk-cli-import-1\n\nsk-cli-import-2\n", "key", "import", "--service", "openai")
	if !strings.Contains(out, "2") {
		t.Errorf("import: %q", out)
	}
	out = cli("", "key", "list", "--service", "openai")
	if strings.Count(out, "openai") != 3 || strings.Contains(out, "sk-cli-import-1") {
		t.Errorf("key list: %q", out)
	}
	cli("", "team", "add", "--name", "eng", "--rpm-limit", "100")
	if out := cli("", "team", "list"); !strings.Contains(out, "eng") {
		t.Errorf("team list: %q", out)
	}
	out = cli("", "token", "create", "--name", "laptop", "--team", "eng")
	tok := regexp.MustCompile(`kp_[0-9A-Za-z]{43}`).FindString(out)
	if tok == "" {
		t.Fatalf("token create: %q", out)
	}
	if out := cli("", "token", "list"); !strings.Contains(out, "laptop") || strings.Contains(out, tok) {
		t.Errorf("token list: %q", out)
	}
	if out := cli("", "service", "list"); !strings.Contains(out, "openai") {
		t.Errorf("service list: %q", out)
	}

	// --json on lists; key import prints a summary; key disable|enable;
	// service, team and token set; usage --csv.
	var keys []map[string]any
	if err := json.Unmarshal([]byte(cli("", "key", "list", "--json")), &keys); err != nil || len(keys) != 3 {
		t.Fatalf("key list --json: %v %v", keys, err)
	}
	out = cli("sk-cli-import-3\n", "key", "import", "--service", "openai")
	if !strings.HasPrefix(out, "imported 1 key to openai\n") || strings.Contains(out, "{") || strings.Contains(out, "sk-cli-import-3") {
		t.Errorf("import summary: %q", out)
	}
	id := keys[0]["id"].(string)
	if out := cli("", "key", "disable", id); out != "key "+id+" is disabled\n" {
		t.Errorf("key disable: %q", out)
	}
	if out := cli("", "key", "enable", id); out != "key "+id+" is active\n" {
		t.Errorf("key enable: %q", out)
	}
	if out := cli("", "key", "disable", id, "--json"); !strings.Contains(out, `"status": "disabled"`) {
		t.Errorf("key disable ID --json: %q", out)
	}
	cli("", "key", "enable", id)
	if out := cli("", "service", "set", "openai", "description=chat models", "rate_limit_rpm=100", "llm_family=openai", "--json"); !strings.Contains(out, `"description": "chat models"`) || !strings.Contains(out, `"rate_limit_rpm": 100`) {
		t.Errorf("service set: %q", out)
	}
	if out := cli("", "team", "set", "eng", "rpm_limit=50", "description=engineers", "--json"); !strings.Contains(out, `"rpm_limit": 50`) {
		t.Errorf("team set: %q", out)
	}
	var toks []map[string]any
	_ = json.Unmarshal([]byte(cli("", "token", "list", "--json")), &toks)
	if len(toks) != 1 {
		t.Fatalf("token list --json: %v", toks)
	}
	if out := cli("", "token", "set", toks[0]["id"].(string), "description=CI", "--json"); !strings.Contains(out, `"description": "CI"`) {
		t.Errorf("token set: %q", out)
	}
	// Tiers: add, list, a key joining one, set, delete.
	if out := cli("", "tier", "add", "--name", "pro", "--feature", "image-generation=100", "--json"); !strings.Contains(out, `"image-generation": 100`) {
		t.Errorf("tier add: %q", out)
	}
	if out := cli("", "tier", "list"); !strings.Contains(out, "pro") || !strings.Contains(out, `{"image-generation":100}`) {
		t.Errorf("tier list: %q", out)
	}
	if out := cli("sk-cli-tier-0123456789\n", "key", "add", "--service", "openai", "--tier", "pro", "--json"); !strings.Contains(out, `"tier": "pro"`) {
		t.Errorf("key add --tier: %q", out)
	}
	if out := cli("", "tier", "set", "pro", `features={"image-generation":200}`, "--json"); !strings.Contains(out, `"image-generation": 200`) {
		t.Errorf("tier set: %q", out)
	}
	// An import line naming an unknown tier: all or nothing by default,
	// the line and the tier named; --partial imports the other lines and
	// the summary counts both.
	tierImport := `[{"key_value":"sk-cli-tier-import-1","tier":"pro"},{"key_value":"sk-cli-tier-import-2","tier":"gold"},{"key_value":"sk-cli-tier-import-3"}]`
	var errb2 bytes.Buffer
	if c := run(context.Background(), []string{"key", "import", "--service", "openai"}, mapEnv(e), strings.NewReader(tierImport), io.Discard, &errb2); c != 1 ||
		!strings.Contains(errb2.String(), `line 2: bad_request: tier "gold" does not exist`) {
		t.Errorf("import with an unknown tier: exit %d %q", c, errb2.String())
	}
	out = cli(tierImport, "key", "import", "--service", "openai", "--partial")
	if !strings.HasPrefix(out, "imported 2 keys to openai; 1 line rejected:\n  line 2: bad_request: tier \"gold\" does not exist") {
		t.Errorf("partial import summary: %q", out)
	}
	if out := cli("sk-cli-tier-import-4\nsk-cli-tier-import-5\n", "key", "import", "--service", "openai", "--tier", "pro", "--json"); strings.Count(out, `"tier": "pro"`) != 2 {
		t.Errorf("import --tier: %q", out)
	}
	// Without --json, one object prints as a FIELD VALUE table.
	if out := cli("", "tier", "add", "--name", "free", "--feature", "chat=10"); !strings.HasPrefix(out, "FIELD") || !regexp.MustCompile(`(?m)^features +\{"chat":10\}$`).MatchString(out) {
		t.Errorf("tier add free: %q", out)
	}
	if out := cli("", "service", "set", "openai", "is_active=false"); strings.Contains(out, "{\n") || !regexp.MustCompile(`(?m)^is_active +false$`).MatchString(out) {
		t.Errorf("service set without --json: %q", out)
	}
	if out := cli("", "service", "list"); !regexp.MustCompile(`IS_ACTIVE\n.*openai .* false\n`).MatchString(out) {
		t.Errorf("service list does not show the service switched off: %q", out)
	}
	cli("", "service", "set", "openai", "is_active=true")
	if out := cli("", "team", "set", "eng", "description=engineering"); !regexp.MustCompile(`(?m)^description +engineering$`).MatchString(out) {
		t.Errorf("team set without --json: %q", out)
	}
	if out := cli("", "usage", "--group-by", "service"); !regexp.MustCompile(`^SERVICE +REQUESTS +TOKENS_IN`).MatchString(out) {
		t.Errorf("usage without --json is not a table: %q", out)
	}
	if out := cli("", "usage", "--json"); !strings.Contains(out, `"rows"`) {
		t.Errorf("usage --json: %q", out)
	}
	if out := cli("", "health"); !regexp.MustCompile(`^NAME +KEYS +AVAILABLE`).MatchString(out) || !strings.Contains(out, "openai") {
		t.Errorf("health without --json is not a table: %q", out)
	}
	var created map[string]any
	if err := json.Unmarshal([]byte(cli("", "token", "create", "--name", "ci", "--team", "eng", "--json")), &created); err != nil || created["token"] == nil {
		t.Errorf("token create --json: %v %v", created, err)
	}
	if out := cli("", "tier", "delete", "free"); out != "deleted tier free\n" {
		t.Errorf("tier delete: %q", out)
	}
	if out := cli("", "usage", "--csv", "--group-by", "service"); !strings.HasPrefix(out, "service,requests,tokens_in,tokens_out,cost\n") {
		t.Errorf("usage --csv: %q", out)
	}

	req, _ := http.NewRequest("GET", url+"/v1/openai/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// The upstream echoes the key it got; keypoold scrubs it from the answer.
	if resp.StatusCode != 200 || !strings.Contains(string(body), "Bearer [redacted]") || strings.Contains(string(body), "sk-cli-") {
		t.Errorf("proxy with the CLI's token: %d %s", resp.StatusCode, body)
	}

	var errb bytes.Buffer
	if c := run(context.Background(), []string{"key", "add", "--service", "nope", "--value", "x"}, mapEnv(e), nil, io.Discard, &errb); c != 1 || !strings.Contains(errb.String(), "400") {
		t.Errorf("bad key add: exit %d %q", c, errb.String())
	}
	if c := run(context.Background(), []string{"frobnicate"}, mapEnv(e), nil, io.Discard, io.Discard); c != 2 {
		t.Errorf("unknown command: exit %d", c)
	}
}
