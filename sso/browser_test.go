package sso_test

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/keypool/keypool/internal/testutil"
)

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

// TestBrowserSignIn walks the whole flow in headless Chromium: sign in,
// approve at the provider, see the token once, use it, sign in again for
// a second token, list both on the self-service page, revoke one; then an
// admin signs in to the console with the "Sign in with Google" button.
// keypoold is configured by the three Google variables, pointed at the
// test provider.
func TestBrowserSignIn(t *testing.T) {
	exe := chromium(t)
	e := start(t, googleVars(t, map[string]string{"KEYPOOL_OIDC_ALLOWED_DOMAINS": "example.com", "KEYPOOL_OIDC_ADMINS": "root@example.com"}))
	e.provider.SetAutoApprove(false)

	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(exe), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.UserDataDir(testutil.ProfileDir(t)), chromedp.WindowSize(1280, 900),
	}
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, cancelB := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelB(); cancelA() })
	// The first Run starts the browser; it must not run on a context
	// with a deadline, whose end would close the browser.
	if err := chromedp.Run(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	run := func(what string, actions ...chromedp.Action) {
		t.Helper()
		ctx, cancel := context.WithTimeout(bctx, 20*time.Second)
		defer cancel()
		if err := chromedp.Run(ctx, actions...); err != nil {
			var loc, html string
			_ = chromedp.Run(bctx, chromedp.Location(&loc), chromedp.OuterHTML("body", &html, chromedp.ByQuery))
			t.Fatalf("%s: %v\nat %s\n%s", what, err, loc, html)
		}
	}
	// read evaluates expr until done reports true, bounded.
	read := func(expr string, dst any, done func() bool) {
		t.Helper()
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			ctx, cancel := context.WithTimeout(bctx, 2*time.Second)
			_ = chromedp.Run(ctx, chromedp.Evaluate(expr, dst))
			cancel()
			if done() {
				return
			}
		}
		var loc string
		_ = chromedp.Run(bctx, chromedp.Location(&loc))
		t.Fatalf("%s: not there within 15 s (at %s)", expr, loc)
	}
	signIn := func(start string) (token, prefix, loc string) {
		t.Helper()
		run("sign in from "+start,
			chromedp.Navigate(e.base+start),
			chromedp.WaitVisible("#approve", chromedp.ByID),
			chromedp.Click("#approve", chromedp.ByID),
		)
		// The click navigates through the callback and a redirect; read
		// the token page by script, which holds no node across the
		// navigation (a node id from an intermediate page goes stale).
		var got struct{ Token, Prefix, Loc string }
		read(`(() => { const t = document.querySelector("#token"), p = document.querySelector("#prefix");
			return {Token: t ? t.textContent : "", Prefix: p ? p.textContent : "", Loc: location.href}; })()`,
			&got, func() bool { return got.Token != "" })
		return got.Token, got.Prefix, got.Loc
	}

	tok1, pre1, loc := signIn("/auth/login")
	if loc != e.base+"/auth/token" || strings.Contains(loc, "code=") {
		t.Errorf("after the callback the address is %q; want %s/auth/token without the code", loc, e.base)
	}
	if !strings.HasPrefix(tok1, pre1) || e.proxied(tok1) != http.StatusOK {
		t.Fatalf("token %q (prefix %q) does not work on the proxy", tok1[:8], pre1)
	}
	var again string
	run("view the token again", chromedp.Navigate(e.base+"/auth/token"), chromedp.Text("#title", &again, chromedp.ByID))
	if again != "Nothing to show" {
		t.Errorf("second view says %q", again)
	}
	tok2, pre2, _ := signIn("/auth/login")
	if tok2 == tok1 || e.proxied(tok2) != http.StatusOK {
		t.Fatal("the second sign-in must show a second, working token")
	}

	var rows int
	run("self-service page", chromedp.Navigate(e.base+"/auth/me"), chromedp.WaitVisible("#tokens", chromedp.ByID),
		chromedp.Evaluate(`document.querySelectorAll("#tokens tr[data-prefix]").length`, &rows))
	if rows != 2 {
		t.Fatalf("the page lists %d tokens, want 2", rows)
	}
	var status string
	row := `tr[data-prefix="` + pre1 + `"]`
	run("revoke the first token", chromedp.Click(row+` button.revoke`, chromedp.ByQuery))
	// The click navigates (POST, then a redirect back to the page); read
	// the row once the new page is there, bounded.
	for deadline := time.Now().Add(10 * time.Second); status != "revoked" && time.Now().Before(deadline); {
		ctx, cancel := context.WithTimeout(bctx, 2*time.Second)
		_ = chromedp.Run(ctx, chromedp.Evaluate(`(document.querySelector('`+row+` .status') || {}).textContent || ""`, &status))
		cancel()
		if status != "revoked" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if status != "revoked" || e.proxied(tok1) != http.StatusUnauthorized || e.proxied(tok2) != http.StatusOK {
		t.Errorf("after revoking %s: status %q; the first token must be refused and the second (%s) work", pre1, status, pre2)
	}

	// An admin signs in to the console with the SSO button.
	e.provider.SetClaims(oidcClaims("root@example.com"))
	var who, button string
	run("admin SSO", chromedp.Navigate(e.base+"/console/login"),
		chromedp.WaitVisible("#sso-login", chromedp.ByID),
		chromedp.Text("#sso-login", &button, chromedp.ByID),
		chromedp.Click("#sso-login", chromedp.ByID),
		chromedp.WaitVisible("#approve", chromedp.ByID),
		chromedp.Click("#approve", chromedp.ByID))
	read(`(document.querySelector("#signed-in-as") || {}).textContent || ""`, &who, func() bool { return who != "" })
	if button != "Sign in with Google" {
		t.Errorf("the console's SSO button says %q, want Sign in with Google", button)
	}
	if !strings.Contains(who, "root@example.com") {
		t.Errorf("console signed in as %q", who)
	}
	e.noSecrets(tok1, tok2)
}
