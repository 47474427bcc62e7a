package sso_test

import (
	"net/http"
	"strings"
	"testing"
)

// TestGoogleVariables: with the three Google variables pointed at a
// provider, a person with an allowed email gets a working token from
// /auth/login without an admin, and an admin sees "Sign in with Google"
// beside the console's password form.
func TestGoogleVariables(t *testing.T) {
	e := start(t, googleVars(t, map[string]string{"KEYPOOL_OIDC_ALLOWED_DOMAINS": "example.com", "KEYPOOL_OIDC_ADMINS": "root@example.com"}))
	c := browser()
	if tok := e.signIn(c); e.proxied(tok) != http.StatusOK {
		t.Fatal("the token from /auth/login does not work on the proxy")
	}
	resp, body := e.get(c, e.base+"/auth/me")
	if resp.StatusCode != http.StatusOK || len(prefixes(body)) != 1 {
		t.Errorf("self-service page: %d, %d tokens listed", resp.StatusCode, len(prefixes(body)))
	}
	_, body = e.get(browser(), e.base+"/console/login")
	if !strings.Contains(body, `href="/auth/login?as=admin">Sign in with Google</a>`) {
		t.Error(`the console's sign-in page has no "Sign in with Google" link to /auth/login?as=admin`)
	}
	e.provider.SetClaims(oidcClaims("mallory@evil.test"))
	resp, _ = e.get(c, e.begin(c, "/auth/login"))
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("a disallowed domain: %d, want 403", resp.StatusCode)
	}
}
