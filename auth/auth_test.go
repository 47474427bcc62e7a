package auth_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

// countingStore counts token lookups.
type countingStore struct {
	store.Store
	lookups atomic.Int64
}

func (c *countingStore) GetTokenByHash(ctx context.Context, h []byte) (store.Token, error) {
	c.lookups.Add(1)
	return c.Store.GetTokenByHash(ctx, h)
}

// clock is a fake clock safe for concurrent use.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func openStore(t *testing.T) *countingStore {
	t.Helper()
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	kr, err := seal.ParseKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	st, err := sqlstore.Open(context.Background(), "sqlite:"+filepath.Join(t.TempDir(), "kp.db"), sqlstore.Options{Keyring: kr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return &countingStore{Store: st}
}

// fixture is a store with a team, a user and tokens of each.
type fixture struct {
	st        *countingStore
	clk       *clock
	a         *auth.Authenticator
	team      store.Team
	user      store.User
	teamTok   string
	teamRec   store.Token
	userTok   string
	userRec   store.Token
	adminTok  string
	otherTeam store.Team
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{st: openStore(t), clk: &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}, adminTok: "admin-secret-token-value"}
	f.team = store.Team{Name: "eng", AllowedServices: []string{"openai"}, Limits: store.Limits{RPMLimit: 60, ModelsEnabled: []string{"gpt-4o"}}}
	if err := f.st.CreateTeam(ctx, &f.team); err != nil {
		t.Fatal(err)
	}
	f.otherTeam = store.Team{Name: "ops"}
	if err := f.st.CreateTeam(ctx, &f.otherTeam); err != nil {
		t.Fatal(err)
	}
	f.user = store.User{ExternalID: "alice@example.com", TeamID: f.otherTeam.ID}
	if err := f.st.CreateUser(ctx, &f.user); err != nil {
		t.Fatal(err)
	}
	f.teamTok, f.teamRec = f.token(t, store.Token{Name: "laptop", TeamID: f.team.ID, IsActive: true, Scopes: []string{auth.ScopeLease},
		Limits: store.Limits{RPMLimit: 5}})
	f.userTok, f.userRec = f.token(t, store.Token{Name: "alice", UserID: f.user.ID, IsActive: true})
	f.a = auth.New(f.st, auth.Config{AdminToken: f.adminTok, Now: f.clk.Now})
	return f
}

func (f *fixture) token(t *testing.T, rec store.Token) (string, store.Token) {
	t.Helper()
	tok, prefix, hash, err := auth.NewToken()
	if err != nil {
		t.Fatal(err)
	}
	rec.Prefix, rec.Hash = prefix, hash
	if err := f.st.CreateToken(context.Background(), &rec); err != nil {
		t.Fatal(err)
	}
	return tok, rec
}

func TestNewToken(t *testing.T) {
	seen := map[string]bool{}
	for range 200 {
		tok, prefix, hash, err := auth.NewToken()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(tok, "kp_") || len(tok) != 46 {
			t.Fatalf("token %q: want kp_ and 43 base62 characters", tok)
		}
		for _, c := range tok[3:] {
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
				t.Fatalf("token has non-base62 character %q", c)
			}
		}
		if prefix != tok[:8] {
			t.Fatalf("prefix %q, want %q", prefix, tok[:8])
		}
		if string(hash) != string(auth.Hash(tok)) || len(hash) != 32 {
			t.Fatal("hash is not SHA-256 of the token")
		}
		if seen[tok] {
			t.Fatal("duplicate token")
		}
		seen[tok] = true
	}
}

func TestAuthenticate(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()

	p, err := f.a.Authenticate(ctx, f.teamTok)
	if err != nil {
		t.Fatalf("team token: %v", err)
	}
	if p.Admin || p.Token.ID != f.teamRec.ID || p.Team.ID != f.team.ID || p.User != nil {
		t.Fatalf("team principal = %+v", p)
	}
	if !p.HasScope(auth.ScopeLease) || p.HasScope("other") {
		t.Error("HasScope")
	}
	team, tok := p.Limits()
	if team.RPMLimit != 60 || tok.RPMLimit != 5 {
		t.Errorf("Limits() = %d, %d", team.RPMLimit, tok.RPMLimit)
	}
	if !p.AllowsService("openai") || p.AllowsService("groq") {
		t.Error("AllowsService")
	}
	if !p.AllowsModel("gpt-4o") || p.AllowsModel("o3") {
		t.Error("AllowsModel")
	}

	p, err = f.a.Authenticate(ctx, f.userTok)
	if err != nil {
		t.Fatalf("user token: %v", err)
	}
	if p.User == nil || p.User.ID != f.user.ID || p.Team.ID != f.otherTeam.ID || p.Token.TeamID != f.otherTeam.ID {
		t.Fatalf("user token should count against the user's team: %+v", p)
	}
	if p.HasScope(auth.ScopeLease) || !p.AllowsService("anything") {
		t.Error("user token scopes / services")
	}

	for name, tok := range map[string]string{
		"empty":       "",
		"admin token": f.adminTok,
		"upstream":    "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
		"wrong kp":    "kp_" + strings.Repeat("A", 43),
		"truncated":   f.teamTok[:20],
		"bad chars":   "kp_" + strings.Repeat("-", 43),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := f.a.Authenticate(ctx, tok)
			if !errors.Is(err, auth.ErrInvalidToken) {
				t.Fatalf("err = %v, want ErrInvalidToken", err)
			}
			if tok != "" && strings.Contains(err.Error(), tok) {
				t.Fatal("error carries the token")
			}
		})
	}
}

func TestMalformedTokensSkipStore(t *testing.T) {
	f := newFixture(t)
	before := f.st.lookups.Load()
	for range 100 {
		_, _ = f.a.Authenticate(context.Background(), "not-a-token")
	}
	if n := f.st.lookups.Load() - before; n != 0 {
		t.Fatalf("%d store lookups for malformed tokens", n)
	}
}

func TestNegativeCache(t *testing.T) {
	f := newFixture(t)
	bogus := "kp_" + strings.Repeat("z", 43)
	for range 50 {
		_, _ = f.a.Authenticate(context.Background(), bogus)
	}
	if n := f.st.lookups.Load(); n != 1 {
		t.Fatalf("%d lookups within the negative TTL, want 1", n)
	}
	f.clk.Add(1500 * time.Millisecond)
	_, _ = f.a.Authenticate(context.Background(), bogus)
	if n := f.st.lookups.Load(); n != 2 {
		t.Fatalf("%d lookups after the negative TTL, want 2", n)
	}
}

func TestExpiryAndRevocation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	exp := f.clk.Now().Add(time.Minute)
	tok, rec := f.token(t, store.Token{Name: "short", TeamID: f.team.ID, IsActive: true, ExpiresAt: &exp})
	if _, err := f.a.Authenticate(ctx, tok); err != nil {
		t.Fatal(err)
	}
	f.clk.Add(time.Minute) // cached, but the expiry is checked on every call
	_, err := f.a.Authenticate(ctx, tok)
	if !errors.Is(err, auth.ErrExpired) {
		t.Fatalf("err = %v, want ErrExpired", err)
	}
	if strings.Contains(err.Error(), tok) || !strings.Contains(err.Error(), rec.Prefix) {
		t.Fatalf("error %q should name the prefix only", err)
	}

	// Revoked in the store by another replica: still accepted from the
	// cache until CacheTTL, then refused.
	if _, err := f.a.Authenticate(ctx, f.teamTok); err != nil {
		t.Fatal(err)
	}
	rec = f.teamRec
	rec.IsActive = false
	if err := f.st.UpdateToken(ctx, &rec); err != nil {
		t.Fatal(err)
	}
	f.clk.Add(4 * time.Second)
	if _, err := f.a.Authenticate(ctx, f.teamTok); err != nil {
		t.Fatalf("within the TTL the cached token still works: %v", err)
	}
	f.clk.Add(time.Second)
	if _, err := f.a.Authenticate(ctx, f.teamTok); !errors.Is(err, auth.ErrInactive) {
		t.Fatalf("after the TTL: err = %v, want ErrInactive", err)
	}

	// Same replica: Invalidate makes it immediate.
	if _, err := f.a.Authenticate(ctx, f.userTok); err != nil {
		t.Fatal(err)
	}
	urec := f.userRec
	urec.IsActive = false
	if err := f.st.UpdateToken(ctx, &urec); err != nil {
		t.Fatal(err)
	}
	f.a.Invalidate(urec.ID)
	if _, err := f.a.Authenticate(ctx, f.userTok); !errors.Is(err, auth.ErrInactive) {
		t.Fatalf("after Invalidate: err = %v, want ErrInactive", err)
	}
}

func TestInvalidateTeamAndUser(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, tok := range []string{f.teamTok, f.userTok} {
		if _, err := f.a.Authenticate(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.st.DeleteTeam(ctx, f.team.ID); err != nil {
		t.Fatal(err)
	}
	f.a.InvalidateTeam(f.team.ID)
	if _, err := f.a.Authenticate(ctx, f.teamTok); !errors.Is(err, auth.ErrInvalidToken) {
		t.Fatalf("deleted team: err = %v", err)
	}
	if err := f.st.DeleteUser(ctx, f.user.ID); err != nil {
		t.Fatal(err)
	}
	f.a.InvalidateUser(f.user.ID)
	if _, err := f.a.Authenticate(ctx, f.userTok); !errors.Is(err, auth.ErrInvalidToken) {
		t.Fatalf("deleted user: err = %v", err)
	}
	f.a.InvalidateHash(auth.Hash(f.teamTok))
	f.a.Purge()
}

func TestIsAdmin(t *testing.T) {
	f := newFixture(t)
	if !f.a.IsAdmin(f.adminTok) {
		t.Error("admin token refused")
	}
	for _, tok := range []string{"", f.adminTok + "x", f.adminTok[:5], f.teamTok} {
		if f.a.IsAdmin(tok) {
			t.Errorf("IsAdmin(%q) = true", tok)
		}
	}
	none := auth.New(f.st, auth.Config{})
	if none.IsAdmin("") || none.IsAdmin("anything") {
		t.Error("without an admin token nothing is admin")
	}
	cfg := auth.Config{AdminToken: f.adminTok}
	for _, s := range []string{cfg.String(), cfg.GoString()} {
		if strings.Contains(s, f.adminTok) {
			t.Errorf("Config prints the admin token: %s", s)
		}
	}
	if p := (&auth.Principal{Admin: true}); !p.HasScope(auth.ScopeLease) || !p.AllowsModel("x") || !p.AllowsService("y") {
		t.Error("admin principal may do everything")
	}
}

func TestConcurrentAuthenticate(t *testing.T) {
	f := newFixture(t)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 50 {
				tok := f.teamTok
				if (i+j)%3 == 0 {
					tok = f.userTok
				}
				if _, err := f.a.Authenticate(context.Background(), tok); err != nil {
					t.Error(err)
					return
				}
				if j%10 == 0 {
					f.a.Invalidate(f.teamRec.ID)
				}
			}
		}()
	}
	wg.Wait()
}

func TestFailureLimiter(t *testing.T) {
	l := auth.NewFailureLimiter(auth.FailureConfig{Max: 3, Window: time.Minute, Size: 2})
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 3 {
		if _, ok := l.Check("1.2.3.4", t0); !ok {
			t.Fatalf("refused after %d failures", i)
		}
		l.Fail("1.2.3.4", t0.Add(time.Duration(i)*time.Second))
	}
	wait, ok := l.Check("1.2.3.4", t0.Add(10*time.Second))
	if ok || wait != 50*time.Second {
		t.Fatalf("Check after 3 failures = %v, %v; want 50s, false", wait, ok)
	}
	if _, ok := l.Check("5.6.7.8", t0); !ok {
		t.Fatal("another address is refused")
	}
	if _, ok := l.Check("1.2.3.4", t0.Add(time.Minute)); !ok {
		t.Fatal("still refused after the window")
	}
	// A new window starts with the next failure.
	l.Fail("1.2.3.4", t0.Add(61*time.Second))
	if _, ok := l.Check("1.2.3.4", t0.Add(62*time.Second)); !ok {
		t.Fatal("one failure in a new window refused")
	}
	// Bounded: a third address evicts the least recently used.
	for range 3 {
		l.Fail("a", t0)
	}
	for range 3 {
		l.Fail("b", t0)
	}
	for range 3 {
		l.Fail("c", t0)
	}
	if _, ok := l.Check("a", t0); !ok {
		t.Fatal("the oldest address should have been forgotten (size 2)")
	}
	if _, ok := l.Check("c", t0); ok {
		t.Fatal("c should be refused")
	}
	l.Reset("c")
	if _, ok := l.Check("c", t0); !ok {
		t.Fatal("Reset did not forget c")
	}
}

func TestFailureLimiterFailed(t *testing.T) {
	l := auth.NewFailureLimiter(auth.FailureConfig{Max: 3, Window: time.Minute})
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 3 {
		if _, slowed := l.Failed("1.2.3.4", t0.Add(time.Duration(i)*time.Second)); slowed {
			t.Fatalf("failure %d slowed down", i+1)
		}
	}
	wait, slowed := l.Failed("1.2.3.4", t0.Add(10*time.Second))
	if !slowed || wait != 50*time.Second {
		t.Fatalf("fourth failure = %v, %v; want 50s, slowed", wait, slowed)
	}
	if _, slowed := l.Failed("5.6.7.8", t0); slowed {
		t.Fatal("another address slowed")
	}
	if _, slowed := l.Failed("1.2.3.4", t0.Add(time.Minute)); slowed {
		t.Fatal("still slowed after the window")
	}
}
