package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/internal/testutil"
)

// Test secrets: long enough to be scrubbed, distinct enough to grep for.
const (
	badSecret  = "sk-bad-0123456789abcdefXYZ"
	goodSecret = "sk-good-0123456789abcdefXYZ"
	teamToken  = "kp_team-token-0123456789"
)

var secretID = map[string]string{badSecret: "bad", goodSecret: "good"}

// fakeClock is a settable clock for the pool.
type fakeClock = testutil.Clock

func newClock() *fakeClock { return testutil.NewClock(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)) }

// hit is one request an upstream received.
type hit struct {
	key    string // key id ("bad", "good", or "" when no known key was sent)
	method string
	uri    string // RequestURI as received
	header http.Header
	body   []byte
}

// upstream is a test server that identifies the pool key on each request
// and answers as its script says.
type upstream struct {
	*httptest.Server
	mu   sync.Mutex
	hits []hit
	n    map[string]int
}

// keyFinder returns which test key a request carries, looking everywhere.
func keyFinder(r *http.Request) string {
	var all []string
	for _, vs := range r.Header {
		all = append(all, vs...)
	}
	all = append(all, r.URL.RawQuery)
	for _, v := range all {
		for s, id := range secretID {
			if strings.Contains(v, s) {
				return id
			}
		}
	}
	return ""
}

// newUpstream starts an upstream whose script gets the key id and how many
// times that key was seen (from 1).
func newUpstream(t *testing.T, script func(w http.ResponseWriter, r *http.Request, key string, n int)) *upstream {
	t.Helper()
	u := &upstream{n: map[string]int{}}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		key := keyFinder(r)
		u.mu.Lock()
		u.n[key]++
		n := u.n[key]
		u.hits = append(u.hits, hit{key: key, method: r.Method, uri: r.RequestURI, header: r.Header.Clone(), body: body})
		u.mu.Unlock()
		script(w, r, key, n)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) Hits() []hit {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]hit(nil), u.hits...)
}

func (u *upstream) Count(key string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n[key]
}

// okScript answers 200 "ok <key>" to every request.
func okScript(w http.ResponseWriter, r *http.Request, key string, n int) {
	w.Header().Set("Content-Type", "text/plain")
	io.WriteString(w, "ok "+key)
}

// newPool returns a pool on clock with the service "svc" at baseURL and
// keys "bad" (tried first: ordered selector, priority 0) and "good".
func newPool(t *testing.T, clock *fakeClock, baseURL string, auth keypool.AuthScheme, ids ...string) *keypool.Pool {
	t.Helper()
	p, err := keypool.New(keypool.Config{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) == 0 {
		ids = []string{"bad", "good"}
	}
	var keys []keypool.Key
	for i, id := range ids {
		sec := map[string]string{"bad": badSecret, "good": goodSecret}[id]
		keys = append(keys, keypool.Key{ID: id, Secret: keypool.Secret(sec), Priority: i})
	}
	if err := p.SetService(keypool.Service{Name: "svc", BaseURL: baseURL, Auth: auth, Selector: &keypool.Ordered{}}, keys); err != nil {
		t.Fatal(err)
	}
	return p
}

func keyStats(t *testing.T, p *keypool.Pool, id string) keypool.KeyStats {
	t.Helper()
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.ID == id {
			return s
		}
	}
	t.Fatalf("no key %q", id)
	return keypool.KeyStats{}
}

// waitFor fails the test if ch does not deliver within a generous bound.
func waitFor[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}
