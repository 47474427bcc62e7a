package sso_test

import (
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/internal/oidctest"
	"github.com/keypool/keypool/server"
)

// TestSignInMakesWorkingTokens: a sign-in shows a new token once, the
// token works on the proxy, and a second sign-in makes a second token
// while the first keeps working.
func TestSignInMakesWorkingTokens(t *testing.T) {
	e := start(t, nil)
	c := browser()
	cb := e.begin(c, "/auth/login")
	code := mustURL(t, cb).Query().Get("code")
	state := mustURL(t, cb).Query().Get("state")
	resp, _ := e.get(c, cb)
	idt := e.provider.LastIDToken()
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/auth/token" {
		t.Fatalf("callback answers %d to %q; want 303 to /auth/token (no code or state left in the address bar)", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, body := e.get(c, e.base+"/auth/token")
	m := tokenRe.FindStringSubmatch(body)
	if resp.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("token page: %d %s", resp.StatusCode, body)
	}
	tok1 := m[1]
	for _, want := range []string{`id="prefix">` + tok1[:8] + `<`, e.base + "/v1/openai/v1", `data-copy="token"`, "alice@example.com"} {
		if !strings.Contains(body, want) {
			t.Errorf("token page lacks %q", want)
		}
	}
	if got := e.proxied(tok1); got != http.StatusOK {
		t.Fatalf("proxy with the new token: %d, want 200", got)
	}
	// Shown once: a second look shows nothing.
	resp, body = e.get(c, e.base+"/auth/token")
	if resp.StatusCode != http.StatusNotFound || strings.Contains(body, tok1) {
		t.Errorf("second view: %d, token shown again: %v", resp.StatusCode, strings.Contains(body, tok1))
	}

	tok2 := e.signIn(c)
	if tok2 == tok1 {
		t.Fatal("the second sign-in showed the same token")
	}
	if e.proxied(tok1) != http.StatusOK || e.proxied(tok2) != http.StatusOK {
		t.Error("both tokens must work")
	}
	users, tokens, teams := e.counts()
	if users != 1 || tokens != 2 || teams != 1 {
		t.Errorf("users, tokens, teams = %d, %d, %d; want 1, 2, 1", users, tokens, teams)
	}
	_, m2 := e.admin("GET", "/admin/users", nil)
	u := m2["users"].([]any)[0].(map[string]any)
	if u["external_id"] != "alice@example.com" {
		t.Errorf("user = %v", u)
	}
	_, tm := e.admin("GET", "/admin/teams", nil)
	if name := tm["teams"].([]any)[0].(map[string]any)["name"]; name != "sso" {
		t.Errorf("default team = %v, want sso", name)
	}
	_, tk := e.admin("GET", "/admin/tokens", nil)
	for _, x := range tk["tokens"].([]any) {
		if x.(map[string]any)["name"] != "sso" || x.(map[string]any)["user_id"] != u["id"] {
			t.Errorf("token = %v, want name sso of the user", x)
		}
	}
	if !strings.Contains(e.audit(), "sso.token_create") {
		t.Error("the audit log does not record the token creation")
	}
	if idt == "" {
		t.Fatal("the provider issued no ID token")
	}
	e.noSecrets(tok1, tok2, code, state, idt)
}

// TestSignInRefusals: every failure shows a clear page and creates
// nothing.
func TestSignInRefusals(t *testing.T) {
	cases := []struct {
		name   string
		claims oidctest.Claims
		// twist changes the callback URL or the client before it is used.
		twist  func(e *env, c *http.Client, cb string) (*http.Client, string)
		status int
		want   string
	}{
		{name: "tampered state", twist: func(e *env, c *http.Client, cb string) (*http.Client, string) {
			u := mustURL(e.t, cb)
			q := u.Query()
			s := q.Get("state")
			q.Set("state", s[:len(s)-2]+flip(s[len(s)-2:]))
			u.RawQuery = q.Encode()
			return c, u.String()
		}, status: 400, want: "altered"},
		{name: "state from another browser", twist: func(e *env, c *http.Client, cb string) (*http.Client, string) {
			return browser(), cb
		}, status: 400, want: "cookie is missing"},
		{name: "expired state", twist: func(e *env, c *http.Client, cb string) (*http.Client, string) {
			e.offset.Store(int64(11 * time.Minute))
			return c, cb
		}, status: 400, want: "expired"},
		{name: "wrong issuer", claims: oidctest.Claims{Email: "bob@example.com", EmailVerified: true, Issuer: "https://evil.test"}, status: 403, want: "could not be verified"},
		{name: "wrong audience", claims: oidctest.Claims{Email: "bob@example.com", EmailVerified: true, Audience: "another-client"}, status: 403, want: "could not be verified"},
		{name: "wrong nonce", claims: oidctest.Claims{Email: "bob@example.com", EmailVerified: true, Nonce: "not-the-nonce"}, status: 403, want: "nonce mismatch"},
		{name: "unverified email", claims: oidctest.Claims{Email: "bob@example.com", EmailVerified: false}, status: 403, want: "not verified"},
		{name: "disallowed domain", claims: oidctest.Claims{Email: "mallory@evil.test", EmailVerified: true}, status: 403, want: "may not sign in"},
		{name: "provider down at the code exchange", twist: func(e *env, c *http.Client, cb string) (*http.Client, string) {
			e.provider.SetDown(true)
			return c, cb
		}, status: 502, want: "could not reach the sign-in provider"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, nil)
			if tc.claims.Email != "" {
				e.provider.SetClaims(tc.claims)
			}
			c := browser()
			cb := e.begin(c, "/auth/login")
			if tc.twist != nil {
				c, cb = tc.twist(e, c, cb)
			}
			resp, body := e.get(c, cb)
			if resp.StatusCode != tc.status || !strings.Contains(body, tc.want) || !strings.Contains(body, `<h1 id="title">`) {
				t.Errorf("callback: %d %s; want %d and a page saying %q", resp.StatusCode, body, tc.status, tc.want)
			}
			if users, tokens, teams := e.counts(); users+tokens+teams != 0 {
				t.Errorf("refused sign-in created users, tokens, teams = %d, %d, %d", users, tokens, teams)
			}
			e.noSecrets(mustURL(t, cb).Query().Get("code"), mustURL(t, cb).Query().Get("state"))
		})
	}
}

func flip(s string) string {
	b := []byte(s)
	for i := range b {
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
	}
	return string(b)
}

// TestReplays: a state is accepted once, and a code once (the provider
// refuses it; keypool shows a page and makes nothing).
func TestReplays(t *testing.T) {
	e := start(t, nil)
	c := browser()
	cb := e.begin(c, "/auth/login")
	saved := c.Jar.Cookies(mustURL(t, e.base+"/auth/callback"))
	if resp, _ := e.get(c, cb); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("first callback: %d", resp.StatusCode)
	}
	// Replayed state: the same URL with the same state cookie again.
	c.Jar.SetCookies(mustURL(t, e.base+"/auth/callback"), saved)
	resp, body := e.get(c, cb)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "already used") {
		t.Errorf("replayed state: %d %s", resp.StatusCode, body)
	}
	// Replayed code: a fresh sign-in's state with the first sign-in's code.
	cb2 := e.begin(c, "/auth/login")
	u := mustURL(t, cb2)
	q := u.Query()
	q.Set("code", mustURL(t, cb).Query().Get("code"))
	u.RawQuery = q.Encode()
	before := e.provider.TokenRequests()
	resp, body = e.get(c, u.String())
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "refused the sign-in code") {
		t.Errorf("replayed code: %d %s", resp.StatusCode, body)
	}
	if e.provider.TokenRequests() == before {
		t.Error("the replayed code did not reach the provider")
	}
	if users, tokens, _ := e.counts(); users != 1 || tokens != 1 {
		t.Errorf("after replays: users, tokens = %d, %d; want 1, 1", users, tokens)
	}
}

// TestDisabledUserMintsNothing: a user an admin disabled gets a page and
// no token.
func TestDisabledUserMintsNothing(t *testing.T) {
	e := start(t, nil)
	c := browser()
	e.signIn(c)
	_, m := e.admin("GET", "/admin/users", nil)
	id := m["users"].([]any)[0].(map[string]any)["id"].(string)
	if st, _ := e.admin("PATCH", "/admin/users/"+id, map[string]any{"disabled": true}); st != http.StatusOK {
		t.Fatalf("disable: %d", st)
	}
	resp, body := e.get(c, e.begin(c, "/auth/login"))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "disabled") {
		t.Errorf("disabled user: %d %s", resp.StatusCode, body)
	}
	if _, tokens, _ := e.counts(); tokens != 1 {
		t.Errorf("tokens = %d, want 1", tokens)
	}
	if resp, _ := e.get(c, e.base+"/auth/me"); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("disabled user's self-service page: %d, want a redirect to sign in", resp.StatusCode)
	}
}

// TestProviderDownAtStart: keypoold starts while the provider is down,
// /auth/login says so, and works once the provider is back, without a
// restart.
func TestProviderDownAtStart(t *testing.T) {
	p := oidctest.New(t.Cleanup, clientID, clientSecret)
	p.SetDown(true)
	began := time.Now()
	e := start(t, func(c *server.OIDCConfig) { c.Issuer = p.URL() })
	if d := time.Since(began); d > 5*time.Second {
		t.Errorf("start took %v with the provider down", d)
	}
	e.provider = p
	p.SetAutoApprove(true)
	c := browser()
	resp, body := e.get(c, e.base+"/auth/login")
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "could not reach the sign-in provider") {
		t.Fatalf("login with the provider down: %d %s", resp.StatusCode, body)
	}
	p.SetDown(false)
	if tok := e.signIn(c); e.proxied(tok) != http.StatusOK {
		t.Error("the token made after the provider came back does not work")
	}
}

// TestProviderHangs: a provider that accepts connections and never
// answers costs each sign-in at most the configured timeout, even when
// it comes right after the start (while keypoold's own discovery is
// waiting) and with other sign-ins waiting at the same time: they share
// one attempt instead of queueing behind each other.
func TestProviderHangs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = conn.Close() })
		}
	}()
	const timeout = time.Second
	e := start(t, func(c *server.OIDCConfig) {
		c.Issuer = "http://" + ln.Addr().String()
		c.Timeout = server.Duration(timeout)
	})
	const n = 5
	took := make([]time.Duration, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			began := time.Now()
			resp, err := browser().Get(e.base + "/auth/login")
			took[i] = time.Since(began)
			if err != nil {
				t.Errorf("login %d: %v", i, err)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "could not reach") {
				t.Errorf("login %d: %d %s", i, resp.StatusCode, body)
			}
		})
	}
	wg.Wait()
	for i, d := range took {
		// Serialised, the last would wait n+1 timeouts.
		if d > 2*timeout+time.Second {
			t.Errorf("login %d waited %v for a hanging provider; the bound is the %v timeout", i, d.Round(time.Millisecond), timeout)
		}
	}
}

// TestConcurrentFirstSignIns: 20 first sign-ins of one new person at once
// make one user and one team, and 20 working tokens.
func TestConcurrentFirstSignIns(t *testing.T) {
	e := start(t, nil)
	const n = 20
	cbs := make([]string, n)
	cs := make([]*http.Client, n)
	for i := range cs {
		cs[i] = browser()
		cbs[i] = e.begin(cs[i], "/auth/login")
	}
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := range cs {
		wg.Go(func() {
			resp, err := cs[i].Get(cbs[i])
			if err != nil {
				return
			}
			resp.Body.Close()
			statuses[i] = resp.StatusCode
		})
	}
	wg.Wait()
	for i, st := range statuses {
		if st != http.StatusSeeOther {
			t.Errorf("sign-in %d: %d", i, st)
		}
	}
	if users, tokens, teams := e.counts(); users != 1 || tokens != n || teams != 1 {
		t.Errorf("users, tokens, teams = %d, %d, %d; want 1, %d, 1", users, tokens, teams, n)
	}
}
