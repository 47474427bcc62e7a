package console_test

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"testing"
)

// client is a cookie-keeping HTTP client that does not follow redirects.
func client(t *testing.T) *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

func post(t *testing.T, c *http.Client, u string, form url.Values, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", u, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func get(t *testing.T, c *http.Client, u string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestConsoleSecurity(t *testing.T) {
	base, pw := startServer(t)
	c := client(t)

	resp, _ := get(t, c, base+"/")
	if resp.StatusCode != 302 || resp.Header.Get("Location") != "/console/" {
		t.Fatalf("GET / = %d %s, want a redirect to /console/", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, _ = get(t, c, base+"/console/services")
	if resp.StatusCode != 303 || !strings.HasPrefix(resp.Header.Get("Location"), "/console/login") {
		t.Fatalf("signed out: %d %s, want the sign-in page", resp.StatusCode, resp.Header.Get("Location"))
	}

	resp, body := post(t, c, base+"/console/login", url.Values{"username": {"admin"}, "password": {"wrong-password"}}, nil)
	if resp.StatusCode != 401 || !strings.Contains(body, "invalid username or password") {
		t.Errorf("wrong password: %d", resp.StatusCode)
	}
	resp, _ = post(t, c, base+"/console/login", url.Values{"username": {"admin"}, "password": {pw}, "next": {"//evil.example/"}}, nil)
	if resp.StatusCode != 303 || resp.Header.Get("Location") != "/console/" {
		t.Fatalf("sign in: %d -> %s (an off-site next must not be followed)", resp.StatusCode, resp.Header.Get("Location"))
	}
	ck := resp.Cookies()
	if len(ck) != 1 || !ck[0].HttpOnly || ck[0].SameSite != http.SameSiteStrictMode || ck[0].Secure {
		t.Errorf("session cookie = %+v, want HttpOnly, SameSite=Strict, not Secure over plain HTTP", ck)
	}
	// Secure behind a TLS-terminating proxy is covered by server's
	// cookieSecure; over TLS directly, r.TLS decides.

	resp, body = get(t, c, base+"/console/")
	h := resp.Header
	if resp.StatusCode != 200 || !strings.Contains(h.Get("Content-Security-Policy"), "script-src 'self'") ||
		h.Get("X-Frame-Options") != "DENY" || h.Get("Cache-Control") != "no-store" || h.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("overview headers: %d %v", resp.StatusCode, h)
	}
	if strings.Contains(body, "<script>") || strings.Contains(body, " onclick=") || strings.Contains(body, "style=") {
		t.Error("a page carries inline script or style, which the CSP forbids")
	}

	// Cross-origin form posts are refused whatever the cookie.
	for _, hdr := range []map[string]string{
		{"Sec-Fetch-Site": "cross-site"},
		{"Sec-Fetch-Site": "same-site"},
		{"Origin": "http://evil.example"},
	} {
		resp, _ = post(t, c, base+"/console/services", url.Values{"name": {"evil"}, "base_url": {"http://127.0.0.1:9"}}, hdr)
		if resp.StatusCode != 403 {
			t.Errorf("cross-origin post %v: %d, want 403", hdr, resp.StatusCode)
		}
	}
	// A same-origin one goes through the API's validation and shows its
	// message, escaped.
	resp, body = post(t, c, base+"/console/services", url.Values{"name": {`<script>alert(1)</script>`}, "base_url": {"http://127.0.0.1:9"}}, map[string]string{"Sec-Fetch-Site": "same-origin"})
	if resp.StatusCode != 400 || strings.Contains(body, "<script>alert") || !strings.Contains(body, "&lt;script&gt;") {
		t.Errorf("invalid service name: %d, body escapes? %v", resp.StatusCode, !strings.Contains(body, "<script>alert"))
	}
	resp, _ = post(t, c, base+"/console/services", url.Values{"name": {"svc"}, "base_url": {"http://127.0.0.1:9"}, "display_name": {`"><svg onload=alert(1)>`}, "rate_limit_rpm": {"sixty"}}, nil)
	if resp.StatusCode != 400 {
		t.Errorf("non-numeric rpm: %d, want the API's 400", resp.StatusCode)
	}
	resp, _ = post(t, c, base+"/console/services", url.Values{"name": {"svc"}, "base_url": {"http://127.0.0.1:9"}, "display_name": {`"><svg onload=alert(1)>`}}, nil)
	if resp.StatusCode != 303 {
		t.Fatalf("create service: %d", resp.StatusCode)
	}
	_, body = get(t, c, base+"/console/services/svc")
	if strings.Contains(body, "<svg onload") || !strings.Contains(body, "&lt;svg onload=alert(1)&gt;") {
		t.Error("a display name is not escaped")
	}

	// Sign out ends the session server-side: the old cookie is refused.
	old := c.Jar.Cookies(mustURL(base))
	post(t, c, base+"/console/logout", nil, nil)
	c2 := client(t)
	c2.Jar.SetCookies(mustURL(base), old)
	resp, _ = get(t, c2, base+"/console/services")
	if resp.StatusCode != 303 {
		t.Errorf("cookie after sign-out: %d, want a redirect to sign in", resp.StatusCode)
	}
}

func mustURL(s string) *url.URL { u, _ := url.Parse(s); return u }

// TestAssetBudget keeps the console's JavaScript and CSS under 200 KB
// gzipped (they are 4 KB today).
func TestAssetBudget(t *testing.T) {
	base, _ := startServer(t)
	var total int
	for _, f := range []string{"console.js", "console.css"} {
		resp, body := get(t, http.DefaultClient, base+"/console/static/"+f)
		if resp.StatusCode != 200 || len(body) == 0 {
			t.Fatalf("%s: %d", f, resp.StatusCode)
		}
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		_, _ = zw.Write([]byte(body))
		_ = zw.Close()
		total += buf.Len()
	}
	if total > 200<<10 {
		t.Errorf("JS + CSS = %d bytes gzipped, over the 200 KB budget", total)
	}
	t.Logf("JS + CSS: %d bytes gzipped", total)
}

// TestConsoleRouter: a router is created from the services form with its
// routes as JSON, its page lists the routes, and its edit form shows them
// for editing.
func TestConsoleRouter(t *testing.T) {
	base, pw := startServer(t)
	c := client(t)
	post(t, c, base+"/console/login", url.Values{"username": {"admin"}, "password": {pw}}, nil)
	resp, body := post(t, c, base+"/console/services", url.Values{"name": {"openai"}, "base_url": {"http://127.0.0.1:9"}}, nil)
	if resp.StatusCode != 303 {
		t.Fatalf("create openai: %d %s", resp.StatusCode, body)
	}
	routes := `[{"model":"claude-*","targets":[{"service":"nope"}]}]`
	resp, body = post(t, c, base+"/console/services", url.Values{"name": {"llm"}, "kind": {"router"}, "routes": {routes}}, nil)
	if resp.StatusCode != 400 || !strings.Contains(body, "does not exist") {
		t.Fatalf("router to an unknown service: %d", resp.StatusCode)
	}
	routes = `[{"model":"fast","targets":[{"service":"openai","model":"gpt-4o-mini"}]}]`
	resp, body = post(t, c, base+"/console/services", url.Values{"name": {"llm"}, "kind": {"router"}, "routes": {routes}}, nil)
	if resp.StatusCode != 303 {
		t.Fatalf("create router: %d %s", resp.StatusCode, body)
	}
	_, body = get(t, c, base+"/console/services/llm")
	if !strings.Contains(body, "<code>fast</code>") || !strings.Contains(body, "as <code>gpt-4o-mini</code>") || !strings.Contains(body, "/v1/llm/v1") {
		t.Errorf("router page does not show its routes:\n%s", body)
	}
	if strings.Contains(body, "Add one key") {
		t.Error("a router page offers to add keys")
	}
	_, body = get(t, c, base+"/console/services")
	if !strings.Contains(body, "router: <code>/v1/llm/v1</code>, 1 route(s)") {
		t.Error("the services list does not mark the router")
	}
	_, body = get(t, c, base+"/console/services/llm/edit")
	if !strings.Contains(body, "gpt-4o-mini") {
		t.Error("the edit form does not show the routes")
	}
	// Saving the edit form unchanged keeps the router working.
	form := url.Values{"kind": {"router"}, "routes": {routes}, "base_url": {""}, "auth_scheme": {"bearer"}}
	resp, body = post(t, c, base+"/console/services/llm/edit", form, nil)
	if resp.StatusCode != 303 {
		t.Fatalf("save router: %d %s", resp.StatusCode, body)
	}
}
