package console_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/keypool/keypool/internal/testutil"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/server"
)

const adminToken = "kpadm_console_browser_test_token_0123456789"

// chromium returns the browser binary, or skips the test (fails it in CI).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no chromium binary found, and CI=true: install Debian's chromium")
	}
	t.Skip("no chromium binary found; install Debian's chromium to run the browser tests")
	return ""
}

// upstream is a stand-in LLM API: the key "sk-test-limited-…" answers 429
// with Retry-After: 120, the others a chat completion with usage.
func upstream(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		if strings.Contains(r.Header.Get("Authorization"), "sk-test-limited") {
			w.Header().Set("Retry-After", "120")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"error":{"message":"rate limited","type":"rate_limit_error"}}`)
			return
		}
		_, _ = io.WriteString(w, `{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}`)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// startServer starts keypoold on loopback and returns its URL and the
// first admin user's password.
func startServer(t *testing.T) (string, string) {
	t.Helper()
	dir := t.TempDir()
	var out bytes.Buffer
	srv, err := server.New(context.Background(), server.Config{
		Database: server.SecretURL("sqlite:" + filepath.Join(dir, "k.db")), DataDir: dir,
		AdminToken: keypool.Secret(adminToken), EncryptionKey: keypool.Secret(strings.Repeat("ab", 32)),
		Logger: slog.New(slog.DiscardHandler), Output: &out,
		Console: server.ConsoleConfig{Password: auth.PasswordParams{MemoryKiB: 1024, Time: 1, Threads: 1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		hs.Close()
		_ = srv.Shutdown(context.Background())
	})
	pw, err := os.ReadFile(filepath.Join(dir, server.AdminPasswordFile))
	if err != nil {
		t.Fatal(err)
	}
	return hs.URL, strings.TrimSpace(string(pw))
}

// shotsDir returns where screenshots go: under the test's temp dir, or
// KEYPOOL_SCREENSHOT_DIR to keep them after the test.
func shotsDir(t *testing.T) string {
	t.Helper()
	shots := os.Getenv("KEYPOOL_SCREENSHOT_DIR")
	if shots == "" {
		shots = t.TempDir()
	} else if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots in %s", shots)
	return shots
}

// browser is a headless Chromium with a fresh profile.
type browser struct {
	t       *testing.T
	ctx     context.Context
	shots   string
	dialogs atomic.Int32 // alert() calls seen
}

func newBrowser(t *testing.T, exe, shots string) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(exe), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.UserDataDir(testutil.ProfileDir(t)), chromedp.WindowSize(1280, 900),
	}
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelB := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelB(); cancelA() })
	b := &browser{t: t, ctx: ctx, shots: shots}
	chromedp.ListenTarget(ctx, func(ev any) {
		if d, ok := ev.(*page.EventJavascriptDialogOpening); ok {
			if d.Type == page.DialogTypeAlert {
				b.dialogs.Add(1)
			}
			go func() { _ = chromedp.Run(ctx, page.HandleJavaScriptDialog(true)) }()
		}
	})
	if err := chromedp.Run(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return b
}

// run runs actions with a deadline.
func (b *browser) run(what string, actions ...chromedp.Action) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Run(ctx, actions...); err != nil {
		var loc, html string
		_ = chromedp.Run(b.ctx, chromedp.Location(&loc), chromedp.OuterHTML("main", &html, chromedp.ByQuery))
		b.t.Fatalf("%s: %v\nat %s\n%s", what, err, loc, html)
	}
}

// shot saves a screenshot of the page as NAME.png.
func (b *browser) shot(name string) {
	b.t.Helper()
	var png []byte
	b.run("screenshot "+name, chromedp.FullScreenshot(&png, 100))
	p := filepath.Join(b.shots, name+".png")
	if err := os.WriteFile(p, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s", p)
}

func (b *browser) text(sel string) string {
	b.t.Helper()
	var s string
	b.run("read "+sel, chromedp.Text(sel, &s, chromedp.ByQuery))
	return s
}

func (b *browser) signIn(base, user, pw string) {
	b.t.Helper()
	b.run("sign in as "+user,
		chromedp.Navigate(base+"/"),
		chromedp.WaitVisible("#username", chromedp.ByID),
		chromedp.SendKeys("#username", user, chromedp.ByID),
		chromedp.SendKeys("#password", pw, chromedp.ByID),
		chromedp.Submit("#password", chromedp.ByID),
		chromedp.WaitVisible("#signed-in-as", chromedp.ByID),
	)
}

// fetchStatus posts a form from the page's own origin with its cookie and
// returns the status.
func (b *browser) fetchStatus(path string, form map[string]string) int {
	b.t.Helper()
	f, _ := json.Marshal(form)
	var status int
	js := fmt.Sprintf(`fetch(%q, {method: "POST", body: new URLSearchParams(%s), redirect: "manual"}).then(r => r.status)`, path, f)
	b.run("fetch "+path, chromedp.Evaluate(js, &status, func(p *runtime.EvaluateParams) *runtime.EvaluateParams { return p.WithAwaitPromise(true) }))
	return status
}

func proxied(t *testing.T, base, token string) int {
	t.Helper()
	req, _ := http.NewRequest("POST", base+"/v1/echo/v1/chat/completions", strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func adminAPI(t *testing.T, base, method, path string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, base+path, rd)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// TestBrowser walks the quick start in a real browser: sign in, create a
// service, paste keys, create a team and a token, use it, watch usage and
// live key state, revoke it; and checks that a viewer cannot create a
// token, a cross-site form post is refused and markup renders as text.
func TestBrowser(t *testing.T) {
	exe := chromium(t)
	start := time.Now()
	up := upstream(t)
	base, pw := startServer(t)
	shots := shotsDir(t)
	b := newBrowser(t, exe, shots)

	b.run("login page", chromedp.Navigate(base+"/"), chromedp.WaitVisible("#username", chromedp.ByID))
	b.shot("01-login")
	b.signIn(base, "admin", pw)
	b.shot("02-overview-empty")

	// A service pointing at the stand-in upstream.
	b.run("create service",
		chromedp.Navigate(base+"/console/services/new"),
		chromedp.WaitVisible("#svc-name", chromedp.ByID),
		chromedp.SendKeys("#svc-name", "echo", chromedp.ByID),
		chromedp.SendKeys("#svc-display_name", "Echo LLM", chromedp.ByID),
		chromedp.SendKeys("#svc-base_url", up.URL, chromedp.ByID),
		chromedp.SendKeys("#svc-rate_limit_rpm", "60", chromedp.ByID),
		chromedp.Submit("#svc-name", chromedp.ByID),
		chromedp.WaitVisible("#bulk-keys", chromedp.ByID),
	)
	// Paste three keys; a bad paste first shows its per-line errors.
	b.run("bad paste",
		chromedp.SendKeys("#bulk-keys", "sk-test-good-000000000001\nsk-test-good-000000000001\n", chromedp.ByID),
		chromedp.Submit("#bulk-keys", chromedp.ByID),
		chromedp.WaitVisible(".error .lines", chromedp.ByQuery),
	)
	if s := b.text(".error"); !strings.Contains(s, "line 2") {
		t.Errorf("per-line import error not shown: %q", s)
	}
	b.run("paste three keys",
		chromedp.SetValue("#bulk-keys", "sk-test-good-000000000001\nsk-test-good-000000000002\nsk-test-limited-00000003\n", chromedp.ByID),
		chromedp.Submit("#bulk-keys", chromedp.ByID),
		chromedp.WaitVisible(".flash", chromedp.ByQuery),
	)
	if s := b.text(".flash"); !strings.Contains(s, "3 keys imported") {
		t.Errorf("flash after import = %q", s)
	}
	var html string
	b.run("read keys", chromedp.OuterHTML("#keys", &html, chromedp.ByID))
	if strings.Contains(html, "sk-test-good-000000000001") || strings.Count(html, `data-key="`) != 3 {
		t.Errorf("keys table shows a secret or not 3 keys: %s", html)
	}
	b.shot("03-service")

	// A team and a token, read from the page.
	b.run("create team",
		chromedp.Navigate(base+"/console/teams"),
		chromedp.WaitVisible("#team-name", chromedp.ByID),
		chromedp.SendKeys("#team-name", "eng", chromedp.ByID),
		chromedp.SetValue("#tlim-rpm_limit", "600", chromedp.ByID),
		chromedp.Submit("#team-name", chromedp.ByID),
		chromedp.WaitVisible("#tok-name", chromedp.ByID),
	)
	var teamURL string
	b.run("create token",
		chromedp.Location(&teamURL),
		chromedp.SendKeys("#tok-name", "laptop", chromedp.ByID),
		chromedp.Submit("#tok-name", chromedp.ByID),
		chromedp.WaitVisible("#new-token", chromedp.ByID),
	)
	teamURL, _, _ = strings.Cut(teamURL, "?")
	var token string
	b.run("read token", chromedp.Value("#new-token", &token, chromedp.ByID), chromedp.Click(`button[data-copy="new-token"]`, chromedp.ByQuery))
	if !strings.HasPrefix(token, "kp_") {
		t.Fatalf("token on the page = %q", token)
	}
	b.shot("04-token-created")
	// It is shown once: the team page no longer has it.
	b.run("team again", chromedp.Navigate(teamURL), chromedp.WaitVisible("#tok-name", chromedp.ByID), chromedp.OuterHTML("html", &html, chromedp.ByQuery))
	if strings.Contains(html, token) {
		t.Error("the token is shown again")
	}

	// Watch the service page while requests go through: the key that
	// answers 429 turns cooling, with a countdown, without a reload.
	b.run("open service", chromedp.Navigate(base+"/console/services/echo"), chromedp.WaitVisible("#keys table", chromedp.ByQuery))
	for i := 0; i < 3; i++ {
		if code := proxied(t, base, token); code != 200 {
			t.Fatalf("proxied request %d: %d", i, code)
		}
	}
	b.run("key turns cooling", chromedp.WaitVisible(`#keys [data-state="cooling"]`, chromedp.ByQuery))
	var c1, c2 string
	b.run("countdown", chromedp.Text(`#keys .countdown`, &c1, chromedp.ByQuery), chromedp.Sleep(2100*time.Millisecond), chromedp.Text(`#keys .countdown`, &c2, chromedp.ByQuery))
	if c1 == "" || c1 == c2 {
		t.Errorf("cooldown does not count down: %q then %q", c1, c2)
	}
	b.shot("05-service-cooling")

	b.run("overview", chromedp.Navigate(base+"/console/"), chromedp.WaitVisible("#live .svc", chromedp.ByQuery))
	b.shot("06-overview")

	b.run("usage", chromedp.Navigate(base+"/console/usage"), chromedp.WaitVisible("#usage-table", chromedp.ByID))
	if n := b.text("#total-requests"); n == "0" || n == "" {
		t.Errorf("usage page shows %q requests", n)
	}
	b.shot("07-usage")

	// Revoke the token; the proxy refuses it.
	b.run("revoke", chromedp.Navigate(teamURL), chromedp.WaitVisible(`form[action*="/revoke"] button`, chromedp.ByQuery),
		chromedp.Click(`form[action*="/revoke"] button`, chromedp.ByQuery), chromedp.WaitVisible(`//p[@class="flash" and contains(., "Token revoked")]`, chromedp.BySearch))
	if code := proxied(t, base, token); code != 401 {
		t.Errorf("revoked token: %d, want 401", code)
	}
	b.shot("08-team-revoked")

	// Markup in a service's fields renders as text.
	xss := `<img src=x onerror=alert(1)>`
	b.run("xss service",
		chromedp.Navigate(base+"/console/services/new"),
		chromedp.WaitVisible("#svc-name", chromedp.ByID),
		chromedp.SendKeys("#svc-name", xss, chromedp.ByID),
		chromedp.SendKeys("#svc-base_url", "http://127.0.0.1:9", chromedp.ByID),
		chromedp.Submit("#svc-name", chromedp.ByID),
		chromedp.WaitVisible(".error", chromedp.ByQuery),
	)
	b.run("xss service 2",
		chromedp.SetValue("#svc-name", "xss", chromedp.ByID),
		chromedp.SetValue("#svc-display_name", xss, chromedp.ByID),
		chromedp.Submit("#svc-name", chromedp.ByID),
		chromedp.WaitVisible("#bulk-keys", chromedp.ByID),
		chromedp.Navigate(base+"/console/services"),
		chromedp.WaitVisible("table", chromedp.ByQuery),
	)
	var imgs int
	b.run("count injected images", chromedp.Evaluate(`document.querySelectorAll('img[src="x"]').length`, &imgs))
	if imgs != 0 || b.dialogs.Load() != 0 {
		t.Errorf("markup was rendered: %d images, %d alerts", imgs, b.dialogs.Load())
	}
	if s := b.text("main"); !strings.Contains(s, xss) {
		t.Errorf("the display name is not shown as text: %q", s)
	}
	b.shot("09-services")

	// A cross-site form post is refused.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, `<!doctype html><form id="f" method="post" action="%s/console/services"><input name="name" value="evil"><input name="base_url" value="http://127.0.0.1:9"><button id="go">go</button></form>`, base)
	}))
	defer evil.Close()
	evilURL := strings.Replace(evil.URL, "127.0.0.1", "localhost", 1)
	b.run("cross-site post", chromedp.Navigate(evilURL), chromedp.WaitVisible("#go", chromedp.ByID), chromedp.Click("#go", chromedp.ByID),
		chromedp.WaitReady("body", chromedp.ByQuery))
	b.run("refusal shown", chromedp.WaitVisible(`//*[contains(., "cross-origin request refused")]`, chromedp.BySearch))
	if code, _ := adminAPI(t, base, "GET", "/admin/services/evil", nil); code != 404 {
		t.Errorf("a cross-site form post created a service: %d", code)
	}
	b.shot("10-cross-site-refused")

	// Admin pages.
	b.run("audit", chromedp.Navigate(base+"/console/audit"), chromedp.WaitVisible("table", chromedp.ByQuery))
	if s := b.text("main"); !strings.Contains(s, "token.create") || strings.Contains(s, token) {
		t.Errorf("audit page: %q", s)
	}
	b.shot("11-audit")
	b.run("create viewer",
		chromedp.Navigate(base+"/console/admin-users"),
		chromedp.WaitVisible("#n-user", chromedp.ByID),
		chromedp.SendKeys("#n-user", "vera", chromedp.ByID),
		chromedp.SendKeys("#n-pw", "vera-password-1", chromedp.ByID),
		chromedp.Submit("#n-user", chromedp.ByID),
		chromedp.WaitVisible(".flash", chromedp.ByQuery),
	)
	b.shot("12-admin-users")

	// A viewer cannot create a token, even by posting the form directly.
	v := newBrowser(t, exe, shots)
	v.signIn(base, "vera", "vera-password-1")
	v.run("viewer team page", chromedp.Navigate(teamURL), chromedp.WaitVisible("#tok-h", chromedp.ByID), chromedp.OuterHTML("main", &html, chromedp.ByQuery))
	if strings.Contains(html, `id="tok-name"`) || strings.Contains(html, "Revoke") {
		t.Error("a viewer is offered the token form")
	}
	teamID := teamURL[strings.LastIndex(teamURL, "/")+1:]
	if st := v.fetchStatus("/console/teams/"+teamID+"/tokens", map[string]string{"name": "sneaky"}); st != 403 {
		t.Errorf("viewer token creation: %d, want 403", st)
	}
	_, toks := adminAPI(t, base, "GET", "/admin/tokens", nil)
	for _, tk := range toks["tokens"].([]any) {
		if tk.(map[string]any)["name"] == "sneaky" {
			t.Error("a viewer created a token")
		}
	}
	v.shot("13-viewer-team")
	v.run("viewer audit", chromedp.Navigate(base+"/console/audit"), chromedp.WaitVisible("main", chromedp.ByQuery))
	if s := v.text("main"); !strings.Contains(s, "viewer role") {
		t.Errorf("viewer audit page: %q", s)
	}
	v.shot("14-viewer-audit-refused")

	b.run("sign out", chromedp.Click(".who button", chromedp.ByQuery), chromedp.WaitVisible("#username", chromedp.ByID))
	t.Logf("browser suite took %s", time.Since(start).Round(time.Millisecond))
}

// TestBrowserTiers manages tiers in a real browser: create one (a bad
// feature line first shows the admin API's error), edit its features,
// put a key in it from the service page and see the key's feature use,
// fail to delete it while it has a key, take the key out and delete it.
func TestBrowserTiers(t *testing.T) {
	exe := chromium(t)
	up := upstream(t)
	base, pw := startServer(t)
	shots := shotsDir(t)
	if code, m := adminAPI(t, base, "POST", "/admin/services", map[string]any{"name": "echo", "base_url": up.URL}); code != 201 {
		t.Fatalf("create service: %d %v", code, m)
	}
	if code, m := adminAPI(t, base, "POST", "/admin/keys", map[string]any{"service": "echo", "key_value": "sk-test-good-000000000001"}); code != 201 {
		t.Fatalf("create key: %d %v", code, m)
	}
	_, ks := adminAPI(t, base, "GET", "/admin/keys?service=echo", nil)
	keyID := ks["keys"].([]any)[0].(map[string]any)["id"].(string)
	keyTier := func() string {
		_, k := adminAPI(t, base, "GET", "/admin/keys/"+keyID, nil)
		s, _ := k["tier"].(string)
		return s
	}
	b := newBrowser(t, exe, shots)
	b.signIn(base, "admin", pw)

	b.run("tiers page", chromedp.Navigate(base+"/console/tiers"), chromedp.WaitVisible("#tier-name", chromedp.ByID))
	b.run("bad tier",
		chromedp.SendKeys("#tier-name", "pro", chromedp.ByID),
		chromedp.SendKeys("#tier-features", "image-generation: lots", chromedp.ByID),
		chromedp.Submit("#tier-name", chromedp.ByID),
		chromedp.WaitVisible(".error", chromedp.ByQuery),
	)
	if s := b.text(".error"); !strings.Contains(s, `"features" must be int`) {
		t.Errorf("error for a non-numeric rpm = %q, want the admin API's message", s)
	}
	var kept string
	b.run("form kept", chromedp.Value("#tier-name", &kept, chromedp.ByID))
	if kept != "pro" {
		t.Errorf("the form lost its values after an error: name %q", kept)
	}
	b.run("create tier",
		chromedp.SetValue("#tier-description", "paying customers", chromedp.ByID),
		chromedp.SetValue("#tier-features", "image-generation: 100\nchat", chromedp.ByID),
		chromedp.Submit("#tier-name", chromedp.ByID),
		chromedp.WaitVisible(".flash", chromedp.ByQuery),
	)
	if s := b.text(".flash"); !strings.Contains(s, "Tier pro created") {
		t.Errorf("flash after create = %q", s)
	}
	if s := b.text(`tr[data-tier="pro"]`); !strings.Contains(s, "image-generation 100 rpm") || !strings.Contains(s, "chat no limit of its own") ||
		!strings.Contains(s, "paying customers") {
		t.Errorf("tier row = %q", s)
	}
	b.shot("tiers-01-created")

	b.run("edit tier",
		chromedp.Click(`tr[data-tier="pro"] a.button`, chromedp.ByQuery),
		chromedp.WaitVisible("#tier-features", chromedp.ByID),
		chromedp.SetValue("#tier-features", "image-generation: 200", chromedp.ByID),
		chromedp.Submit("#tier-features", chromedp.ByID),
		chromedp.WaitVisible(`//p[@class="flash" and contains(., "Tier pro saved")]`, chromedp.BySearch),
	)
	_, tier := adminAPI(t, base, "GET", "/admin/tiers/pro", nil)
	if f, _ := tier["features"].(map[string]any); len(f) != 1 || f["image-generation"] != float64(200) {
		t.Errorf("tier after edit: %v", tier)
	}

	// setTier picks a tier for the key on its service's page and waits
	// for the flash saying so; deleteTier presses the tier's Delete
	// button and waits for the flash.
	setTier := func(tier, flash string) {
		sel := "#tier-" + keyID
		b.run("key's tier "+tier,
			chromedp.Navigate(base+"/console/services/echo"),
			chromedp.WaitVisible(sel, chromedp.ByID),
			chromedp.SetValue(sel, tier, chromedp.ByID),
			chromedp.Submit(sel, chromedp.ByID),
			chromedp.WaitVisible(`//p[@class="flash" and contains(., "`+flash+`")]`, chromedp.BySearch),
		)
	}
	deleteTier := func(flash string) {
		b.run("delete tier, expecting "+flash,
			chromedp.Navigate(base+"/console/tiers"),
			chromedp.WaitVisible(`tr[data-tier="pro"] button.danger`, chromedp.ByQuery),
			chromedp.Click(`tr[data-tier="pro"] button.danger`, chromedp.ByQuery),
			chromedp.WaitVisible(`//p[@class="flash" and contains(., "`+flash+`")]`, chromedp.BySearch),
		)
	}
	setTier("pro", "now in tier pro")
	if got := keyTier(); got != "pro" {
		t.Errorf("key's tier after the form = %q, want pro", got)
	}
	if s := b.text(`#keys [data-feature="image-generation"]`); !strings.Contains(s, "0 / 200") {
		t.Errorf("key's feature use = %q, want 0 / 200", s)
	}
	b.shot("tiers-02-key-in-tier")

	// A tier with keys is not deleted; the API's reason is shown.
	deleteTier("still has keys")
	setTier("", "in no tier")
	if got := keyTier(); got != "" {
		t.Errorf("key's tier after leaving = %q", got)
	}
	deleteTier("Tier pro deleted")
	if code, _ := adminAPI(t, base, "GET", "/admin/tiers/pro", nil); code != 404 {
		t.Errorf("deleted tier: GET answers %d", code)
	}
	b.shot("tiers-03-deleted")
}
