package sso_test

import (
	"github.com/keypool/keypool/internal/oidctest"
	"github.com/keypool/keypool/server"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

var rowRe = regexp.MustCompile(`<tr data-prefix="(kp_[A-Za-z0-9]+)">`)

func prefixes(body string) []string {
	var out []string
	for _, m := range rowRe.FindAllStringSubmatch(body, -1) {
		out = append(out, m[1])
	}
	return out
}

// lastUsed returns the "last used" cell of the token with this prefix.
func lastUsed(body, prefix string) string {
	m := regexp.MustCompile(`(?s)<tr data-prefix="` + prefix + `">.*?<td class="last-used">([^<]*)</td>`).FindStringSubmatch(body)
	if m == nil {
		return "(no row)"
	}
	return m[1]
}

// tokenID finds the id of the token with this prefix (admin API).
func (e *env) tokenID(prefix string) string {
	e.t.Helper()
	_, m := e.admin("GET", "/admin/tokens", nil)
	for _, x := range m["tokens"].([]any) {
		if x.(map[string]any)["prefix"] == prefix {
			return x.(map[string]any)["id"].(string)
		}
	}
	e.t.Fatalf("no token with prefix %s", prefix)
	return ""
}

// TestSelfService: a user sees and manages their own tokens only, and
// their usage and team budget.
func TestSelfService(t *testing.T) {
	e := start(t, nil)
	alice, bob := browser(), browser()
	a1 := e.signIn(alice)
	a2 := e.signIn(alice)
	e.provider.SetClaims(oidcClaims("bob@example.com"))
	b1 := e.signIn(bob)

	_, tm := e.admin("GET", "/admin/teams", nil)
	teamID := tm["teams"].([]any)[0].(map[string]any)["id"].(string)
	if st, _ := e.admin("PATCH", "/admin/teams/"+teamID, map[string]any{"daily_token_limit": 1000, "limit_cost_month_block": 50}); st != http.StatusOK {
		t.Fatalf("set team limits: %d", st)
	}
	if e.proxied(a1) != http.StatusOK {
		t.Fatal("alice's token does not work")
	}

	resp, body := e.get(alice, e.base+"/auth/me")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/auth/me: %d %s", resp.StatusCode, body)
	}
	got := prefixes(body)
	if len(got) != 2 || !strings.Contains(strings.Join(got, " "), a1[:8]) || !strings.Contains(strings.Join(got, " "), a2[:8]) {
		t.Errorf("alice sees %v, want her two tokens %s %s", got, a1[:8], a2[:8])
	}
	for _, leak := range []string{b1[:8], "bob@example.com", a1, a2} {
		if strings.Contains(body, leak) {
			t.Errorf("alice's page shows %q (another user's token, or a token after its one showing)", leak)
		}
	}
	for _, want := range []string{"Tokens today", "1000", "Cost this month", "$50.00"} {
		if !strings.Contains(body, want) {
			t.Errorf("alice's page lacks the budget line %q", want)
		}
	}
	// Usage is written in batches (about a second): wait for it, bounded.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(body, `<td>1</td><td>15</td>`) {
		if time.Now().After(deadline) {
			t.Fatalf("alice's page never showed 1 request of 15 tokens for her token: %s", body)
		}
		time.Sleep(200 * time.Millisecond)
		_, body = e.get(alice, e.base+"/auth/me")
	}
	if !strings.Contains(body, `<td>15</td><td>1000</td>`) {
		t.Errorf("team budget does not show 15 of 1000 tokens today")
	}
	if used, today := lastUsed(body, a1[:8]), time.Now().UTC().Format("2006-01-02"); used != today {
		t.Errorf("alice's used token was last used %q, want %s (today)", used, today)
	}
	if used := lastUsed(body, a2[:8]); used != "—" {
		t.Errorf("alice's unused token was last used %q, want —", used)
	}

	// Alice cannot revoke Bob's token.
	resp, _ = e.post(alice, "/auth/me/tokens/"+e.tokenID(b1[:8])+"/revoke")
	if resp.StatusCode != http.StatusNotFound || e.proxied(b1) != http.StatusOK {
		t.Errorf("alice revoking bob's token: %d; bob's token must still work", resp.StatusCode)
	}
	// A cross-site form post is refused.
	req, _ := http.NewRequest("POST", e.base+"/auth/me/tokens/"+e.tokenID(a1[:8])+"/revoke", nil)
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	if resp, err := alice.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("cross-site revoke: %v %v", resp, err)
	}
	// Alice revokes her first token: it stops working at once; the
	// second keeps working.
	resp, _ = e.post(alice, "/auth/me/tokens/"+e.tokenID(a1[:8])+"/revoke")
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("revoke: %d", resp.StatusCode)
	}
	if e.proxied(a1) != http.StatusUnauthorized || e.proxied(a2) != http.StatusOK {
		t.Error("after revoking a1: a1 must be refused and a2 must work")
	}
	_, body = e.get(alice, e.base+"/auth/me")
	if !strings.Contains(body, "revoked") {
		t.Error("the page does not show the revoked token as revoked")
	}
	// Create another: shown once.
	resp, _ = e.post(alice, "/auth/me/tokens")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/auth/token" {
		t.Fatalf("create: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	_, body = e.get(alice, e.base+"/auth/token")
	m := tokenRe.FindStringSubmatch(body)
	if m == nil || e.proxied(m[1]) != http.StatusOK {
		t.Fatalf("the created token is not shown or does not work: %s", body)
	}
	// Bob's session does not open Alice's one-time view, and no session
	// means no page.
	if resp, _ := e.get(browser(), e.base+"/auth/me"); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("/auth/me without a session: %d", resp.StatusCode)
	}
	e.noSecrets(a1, a2, b1, m[1])
}

// TestAdminSignIn: an admin email opens a console session by SSO; anyone
// else is refused without an admin user being made.
func TestAdminSignIn(t *testing.T) {
	e := start(t, nil)
	c := browser()
	_, body := e.get(c, e.base+"/console/login")
	if !strings.Contains(body, `href="/auth/login?as=admin"`) {
		t.Error("the console's sign-in page has no Sign in with SSO button")
	}
	// Not an admin.
	resp, body := e.get(c, e.begin(c, "/auth/login?as=admin"))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "not an administrator") {
		t.Errorf("alice as admin: %d %s", resp.StatusCode, body)
	}
	_, au := e.admin("GET", "/admin/admin-users", nil)
	before := len(au["admin_users"].([]any))
	// An admin.
	e.provider.SetClaims(oidcClaims("root@example.com"))
	resp, _ = e.get(c, e.begin(c, "/auth/login?as=admin"))
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/auth/done" {
		t.Fatalf("admin callback: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, body = e.get(c, e.base+"/auth/done")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, `url=/console/`) {
		t.Errorf("done page: %d %s", resp.StatusCode, body)
	}
	resp, body = e.get(c, e.base+"/console/")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "root@example.com") {
		t.Errorf("console after SSO: %d", resp.StatusCode)
	}
	_, au = e.admin("GET", "/admin/admin-users", nil)
	if n := len(au["admin_users"].([]any)); n != before+1 {
		t.Errorf("admin users: %d, want %d", n, before+1)
	}
	if _, tokens, _ := e.counts(); tokens != 0 {
		t.Errorf("an admin sign-in made %d client tokens", tokens)
	}
	if !strings.Contains(e.audit(), "sso.admin_login") {
		t.Error("no sso.admin_login in the audit log")
	}
	e.noSecrets()
}

// TestTeamsAndGroups: a mapped domain's users join its team; a member of
// the admin group signs in to the console; the group does not make
// anyone else an admin.
func TestTeamsAndGroups(t *testing.T) {
	e := start(t, func(c *server.OIDCConfig) {
		c.DomainTeams = map[string]string{"corp.example": "corp"}
		c.AllowedDomains = []string{"example.com", "corp.example"}
		c.AdminGroup = "keypool-admins"
		c.Admins = nil
	})
	e.provider.SetClaims(oidcClaims("carol@corp.example"))
	e.signIn(browser())
	e.provider.SetClaims(oidcClaims("dave@example.com"))
	e.signIn(browser())
	_, tm := e.admin("GET", "/admin/teams", nil)
	names := map[string]string{}
	for _, x := range tm["teams"].([]any) {
		names[x.(map[string]any)["id"].(string)] = x.(map[string]any)["name"].(string)
	}
	_, us := e.admin("GET", "/admin/users", nil)
	for _, x := range us["users"].([]any) {
		u := x.(map[string]any)
		want := map[string]string{"carol@corp.example": "corp", "dave@example.com": "sso"}[u["external_id"].(string)]
		if names[u["team_id"].(string)] != want {
			t.Errorf("%s is in team %q, want %q", u["external_id"], names[u["team_id"].(string)], want)
		}
	}
	c := browser()
	resp, _ := e.get(c, e.begin(c, "/auth/login?as=admin"))
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("dave without the group as admin: %d", resp.StatusCode)
	}
	e.provider.SetClaims(oidctest.Claims{Email: "erin@elsewhere.test", EmailVerified: true, Groups: []string{"keypool-admins"}})
	resp, _ = e.get(c, e.begin(c, "/auth/login?as=admin"))
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/auth/done" {
		t.Errorf("admin group member: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, _ := e.get(c, e.base+"/console/"); resp.StatusCode != http.StatusOK {
		t.Errorf("console for the group admin: %d", resp.StatusCode)
	}
}
