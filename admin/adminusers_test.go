package admin_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/store"
)

// cheap are argon2id parameters that keep tests fast.
var cheap = auth.PasswordParams{MemoryKiB: 1024, Time: 1, Threads: 1}

// fakeClock is a settable clock safe for concurrent use.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time         { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) add(d time.Duration)    { c.ns.Add(int64(d)) }
func newClock() *fakeClock                  { c := &fakeClock{}; c.ns.Store(time.Now().UnixNano()); return c }
func (e *env) adminStore() store.AdminStore { return e.st.(store.AdminStore) }

// sessionEnv is an admin API with sign-in, a fake clock and two users:
// root (admin) and vera (viewer).
func sessionEnv(t *testing.T, b backend, lim *auth.LoginLimiter) (*env, *fakeClock) {
	t.Helper()
	clk := newClock()
	var e *env
	e = newEnv(t, b, func(c *admin.Config) {
		as := c.Store.(store.AdminStore)
		s, err := auth.NewSessions(auth.SessionConfig{Store: as, TTL: time.Hour, Params: cheap, Limiter: lim, Now: clk.now})
		if err != nil {
			t.Fatal(err)
		}
		c.Sessions = s
		c.Now = clk.now
	})
	e.must(201, "POST", "/admin/admin-users", map[string]any{"username": "root", "password": "root-password-1", "role": "admin"})
	e.must(201, "POST", "/admin/admin-users", map[string]any{"username": "vera", "password": "vera-password-1", "role": "viewer"})
	return e, clk
}

func (e *env) login(user, pw string, opts ...reqOpt) resp {
	e.t.Helper()
	return e.do("POST", "/admin/auth/login", map[string]string{"username": user, "password": pw}, append([]reqOpt{withToken("")}, opts...)...)
}

func (e *env) session(user, pw string) string {
	e.t.Helper()
	r := e.login(user, pw)
	if r.status != 200 {
		e.t.Fatalf("login %s: %d %s", user, r.status, r.body)
	}
	m := r.json(e.t)
	if m["token_type"] != "bearer" || m["expires_in"] != float64(3600) {
		e.t.Fatalf("login answer = %v", m)
	}
	return m["access_token"].(string)
}

func TestSessionLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e, clk := sessionEnv(t, b, nil)
		tok := e.session("root", "root-password-1")
		e.must(201, "POST", "/admin/services", map[string]any{"name": "svc", "base_url": "https://svc.example", "auth_scheme": "bearer"}, withToken(tok))
		if me := e.must(200, "GET", "/admin/auth/me", nil, withToken(tok)).json(t); me["username"] != "root" || me["role"] != "admin" {
			t.Errorf("me = %v", me)
		}
		// The static admin token keeps working beside sessions.
		e.must(200, "GET", "/admin/services", nil)

		// Expiry.
		clk.add(time.Hour)
		if r := e.do("GET", "/admin/services", nil, withToken(tok)); r.status != 401 || !strings.Contains(r.message(), "expired") {
			t.Errorf("expired session: %d %s", r.status, r.body)
		}
		// Logout.
		tok = e.session("root", "root-password-1")
		e.must(204, "POST", "/admin/auth/logout", nil, withToken(tok))
		e.must(401, "GET", "/admin/services", nil, withToken(tok))
		e.must(400, "POST", "/admin/auth/logout", nil) // the static token cannot sign out

		// A password change and disabling end every session of the user.
		t1, t2 := e.session("vera", "vera-password-1"), e.session("vera", "vera-password-1")
		e.must(200, "PATCH", "/admin/admin-users/vera", map[string]any{"password": "vera-password-2"})
		e.must(401, "GET", "/admin/services", nil, withToken(t1))
		e.must(401, "GET", "/admin/services", nil, withToken(t2))
		t3 := e.session("vera", "vera-password-2")
		e.must(200, "PATCH", "/admin/admin-users/vera", map[string]any{"disabled": true})
		e.must(401, "GET", "/admin/services", nil, withToken(t3))
		if r := e.login("vera", "vera-password-2"); r.status != 401 {
			t.Errorf("disabled user signed in: %d", r.status)
		}
		// A session shared through the store works on any replica: a
		// second API over the same store accepts it.
		tok = e.session("root", "root-password-1")
		s2, _ := auth.NewSessions(auth.SessionConfig{Store: e.adminStore(), Params: cheap, Now: clk.now})
		if id, err := s2.Lookup(context.Background(), tok); err != nil || id.Username != "root" {
			t.Errorf("second replica: %v %v", id, err)
		}
		// Self-protection.
		e.must(400, "PATCH", "/admin/admin-users/root", map[string]any{"disabled": true}, withToken(tok))
		e.must(400, "DELETE", "/admin/admin-users/root", nil, withToken(tok))
		e.noSecret("root-password-1")
		e.noSecret("vera-password-2")
		e.noSecret("argon2id")
	})
}

func TestViewerReadsOnly(t *testing.T) {
	e, _ := sessionEnv(t, backends[0], nil)
	e.must(201, "POST", "/admin/teams", map[string]any{"name": "eng"})
	tok := e.session("vera", "vera-password-1")
	for _, p := range []string{"/admin/services", "/admin/keys", "/admin/teams", "/admin/tokens", "/admin/usage", "/admin/health", "/admin/auth/me"} {
		e.must(200, "GET", p, nil, withToken(tok))
	}
	for _, c := range []struct{ method, path string }{
		{"POST", "/admin/tokens"}, {"POST", "/admin/services"}, {"POST", "/admin/keys"}, {"POST", "/admin/keys/import"},
		{"DELETE", "/admin/teams/x"}, {"PATCH", "/admin/keys/x"},
		{"GET", "/admin/admin-users"}, {"POST", "/admin/admin-users"}, {"GET", "/admin/audit"},
	} {
		if r := e.do(c.method, c.path, map[string]any{"name": "x", "team_id": "x"}, withToken(tok)); r.status != 403 || r.code() != "forbidden" {
			t.Errorf("viewer %s %s: %d %s, want 403", c.method, c.path, r.status, r.body)
		}
	}
	if ts := e.must(200, "GET", "/admin/tokens", nil).json(t)["tokens"]; ts != nil && len(ts.([]any)) != 0 {
		t.Errorf("a viewer created a token: %v", ts)
	}
	e.must(204, "POST", "/admin/auth/logout", nil, withToken(tok))
}

func TestAuditLog(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e, _ := sessionEnv(t, b, nil)
		tok := e.session("root", "root-password-1")
		team := e.must(201, "POST", "/admin/teams", map[string]any{"name": "eng"}, withToken(tok)).json(t)
		created := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "laptop", "team_id": team["id"]},
			withToken(tok), withHeader("X-Forwarded-For", "203.0.113.9")).json(t)
		e.must(201, "POST", "/admin/services", map[string]any{"name": "svc", "base_url": "https://svc.example", "auth_scheme": "bearer"})
		e.must(201, "POST", "/admin/keys", map[string]any{"service": "svc", "key_value": "sk-audit-secret-value-1"})
		e.must(400, "POST", "/admin/services", map[string]any{"name": "BAD NAME"}, withToken(tok))
		e.login("root", "wrong-password")
		e.login("correct horse battery staple", "x") // a password typed as a username

		entries := e.must(200, "GET", "/admin/audit?limit=20", nil, withToken(tok)).json(t)["entries"].([]any)
		var got []string
		for _, x := range entries {
			m := x.(map[string]any)
			str := func(v any) string { x, _ := v.(string); return x }
			got = append(got, str(m["actor"])+" "+str(m["action"])+" "+str(m["target"]))
			if m["addr"] == "" || m["time"] == "" {
				t.Errorf("entry without addr or time: %v", m)
			}
		}
		want := []string{
			"- auth.login_failed (unknown user)",
			"- auth.login_failed root",
			"root service.create ",
			"admin-token key.create " + e.must(200, "GET", "/admin/keys", nil).json(t)["keys"].([]any)[0].(map[string]any)["id"].(string),
			"admin-token service.create svc",
			"root token.create " + created["id"].(string),
			"root team.create " + team["id"].(string),
			"root auth.login " + "",
		}
		if len(got) < len(want) {
			t.Fatalf("audit = %q", got)
		}
		for i, w := range want {
			if i == len(want)-1 {
				if !strings.HasPrefix(got[i], "root auth.login adm_") {
					t.Errorf("audit[%d] = %q, want a login of root", i, got[i])
				}
				continue
			}
			if got[i] != w {
				t.Errorf("audit[%d] = %q, want %q", i, got[i], w)
			}
		}
		e.noSecret(created["token"].(string), `"token":"kp_`)
		for _, x := range entries {
			m := x.(map[string]any)
			for _, v := range m {
				if s, ok := v.(string); ok && (strings.Contains(s, "kp_") || strings.Contains(s, "sk-audit") || strings.Contains(s, "correct horse")) {
					t.Errorf("secret in the audit log: %v", m)
				}
			}
		}
	})
}

func TestLoginThrottle(t *testing.T) {
	lim := auth.NewLoginLimiter(auth.LoginLimiterConfig{
		PerAddress:     auth.FailureConfig{Max: 20, Window: time.Minute},
		PerUserAddress: auth.FailureConfig{Max: 3, Window: time.Minute},
		PerUser:        auth.FailureConfig{Max: 6, Window: time.Minute},
	})
	e, clk := sessionEnv(t, backends[0], lim)
	// The real user signs in once from their usual address.
	e.session("root", "root-password-1")

	// Unknown user and wrong password get the same answer.
	a, b := e.login("nobody", "whatever-pw"), e.login("root", "whatever-pw")
	if a.status != 401 || b.status != 401 || a.message() != b.message() {
		t.Errorf("unknown user %d %q vs wrong password %d %q", a.status, a.message(), b.status, b.message())
	}
	// Per username and address: the third failure for root from here
	// locks root out from here, even with the right password.
	e.login("root", "whatever-pw")
	e.login("root", "whatever-pw")
	r := e.login("root", "root-password-1")
	if r.status != 429 || r.header.Get("Retry-After") == "" {
		t.Fatalf("after 3 failures: %d %s, want 429 with Retry-After", r.status, r.body)
	}
	// Another user from the same address is not affected.
	if r := e.login("vera", "vera-password-1"); r.status != 200 {
		t.Errorf("vera locked out by root's failures: %d", r.status)
	}
	clk.add(time.Minute)
	e.session("root", "root-password-1")
}

func TestLoginThrottlePerUserSpareKnownAddress(t *testing.T) {
	lim := auth.NewLoginLimiter(auth.LoginLimiterConfig{
		PerAddress:     auth.FailureConfig{Max: 3, Window: time.Minute},
		PerUserAddress: auth.FailureConfig{Max: 3, Window: time.Minute},
		PerUser:        auth.FailureConfig{Max: 5, Window: time.Minute},
	})
	now := time.Now()
	// The real user has signed in from 10.0.0.1 before.
	lim.Succeed("root", "10.0.0.1")
	// An attacker spreads guesses over many addresses.
	for i := range 10 {
		addr := "198.51.100." + string(rune('0'+i))
		if _, ok := lim.Check("root", addr, now); ok {
			lim.Fail("root", addr, now)
		}
	}
	if _, ok := lim.Check("root", "198.51.100.200", now); ok {
		t.Error("a new address may still guess root's password after the per-user limit")
	}
	if _, ok := lim.Check("root", "10.0.0.1", now); !ok {
		t.Error("the real user, from their usual address, is locked out by someone else's failures")
	}
	if _, ok := lim.Check("vera", "198.51.100.200", now); !ok {
		t.Error("another user is locked out")
	}
	if _, ok := lim.Check("root", "198.51.100.200", now.Add(time.Minute)); !ok {
		t.Error("the per-user limit does not end with its window")
	}
}

func TestLoginConstantWork(t *testing.T) {
	e, _ := sessionEnv(t, backends[0], auth.NewLoginLimiter(auth.LoginLimiterConfig{
		PerAddress: auth.FailureConfig{Max: 1000}, PerUserAddress: auth.FailureConfig{Max: 1000}, PerUser: auth.FailureConfig{Max: 1000},
	}))
	// Both paths run one argon2id check: the unknown user's is against a
	// dummy hash of the same cost. Compare the fastest of several tries.
	best := func(user string) time.Duration {
		m := time.Hour
		for range 5 {
			start := time.Now()
			e.login(user, "not-the-password")
			m = min(m, time.Since(start))
		}
		return m
	}
	unknown, wrong := best("nobody-here"), best("root")
	if unknown < wrong/3 {
		t.Errorf("unknown user answered in %v, wrong password in %v: the difference tells users apart", unknown, wrong)
	}
}

func TestConcurrentLogins(t *testing.T) {
	e, _ := sessionEnv(t, backends[0], nil)
	var wg sync.WaitGroup
	toks := make([]string, 20)
	for i := range toks {
		wg.Go(func() {
			r := e.login("root", "root-password-1", withHeader("X-Test", "1"))
			if r.status == 200 {
				toks[i] = r.json(t)["access_token"].(string)
			}
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, tk := range toks {
		if tk == "" || seen[tk] {
			t.Fatalf("concurrent logins: missing or repeated token in %q", toks)
		}
		seen[tk] = true
	}
}
