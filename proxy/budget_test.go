package proxy

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool"
)

// scriptedKeys is an upstream whose answer depends on the key (Bearer
// sk-kN → answers[N]) and that counts hits per key.
type scriptedKeys struct {
	*httptest.Server
	hits [8]atomic.Int64
}

func newScriptedKeys(t *testing.T, answers ...func(w http.ResponseWriter, r *http.Request)) *scriptedKeys {
	t.Helper()
	u := &scriptedKeys{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var n int
		if _, err := fmt.Sscanf(r.Header.Get("Authorization"), "Bearer sk-k%d", &n); err != nil || n >= len(answers) {
			w.WriteHeader(400)
			return
		}
		u.hits[n].Add(1)
		answers[n](w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *scriptedKeys) total() int64 {
	var n int64
	for i := range u.hits {
		n += u.hits[i].Load()
	}
	return n
}

func scriptedPool(t *testing.T, baseURL string, n int) *keypool.Pool {
	t.Helper()
	p, err := keypool.New(keypool.Config{Now: newClock().Now})
	if err != nil {
		t.Fatal(err)
	}
	var keys []keypool.Key
	for i := range n {
		keys = append(keys, keypool.Key{ID: fmt.Sprintf("k%d", i), Secret: keypool.Secret(fmt.Sprintf("sk-k%d", i)), Priority: i})
	}
	if err := p.SetService(keypool.Service{Name: "svc", BaseURL: baseURL, Selector: &keypool.Ordered{}}, keys); err != nil {
		t.Fatal(err)
	}
	return p
}

func status(code int, body string, hdr ...string) func(w http.ResponseWriter, r *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i+1 < len(hdr); i += 2 {
			w.Header().Set(hdr[i], hdr[i+1])
		}
		w.WriteHeader(code)
		io.WriteString(w, body)
	}
}

// TestKeyRefusalsSpendNoAttempts is issue 8's scenario on the Transport:
// 429, 401 and 500 on the first three keys do not stop a request while
// two healthy keys remain (MaxAttempts 3 counts the 500 only).
func TestKeyRefusalsSpendNoAttempts(t *testing.T) {
	up := newScriptedKeys(t,
		status(429, `{"error":{"message":"slow"}}`, "Retry-After", "30"),
		status(401, `{"error":{"code":"invalid_api_key"}}`),
		status(500, `boom`),
		status(200, `served`),
		status(200, `served`),
	)
	pool := scriptedPool(t, up.URL, 5)
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	var wg sync.WaitGroup
	var bad atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				resp, err := client.Post(up.URL+"/x", "text/plain", strings.NewReader("hi"))
				if err != nil {
					bad.Add(1)
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != "served" {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of 200 requests failed", bad.Load())
	}
	// The 429 key cooled after its first answer and was not hit again.
	if n := up.hits[0].Load(); n > 8 {
		t.Errorf("429 key hit %d times, want only before its cooldown was known (≤ 8 concurrent)", n)
	}
	if st := keyStats(t, pool, "k0"); st.State != keypool.StateCooling {
		t.Errorf("429 key state %v, want cooling", st.State)
	}
	if st := keyStats(t, pool, "k1"); st.State != keypool.StateInvalid {
		t.Errorf("401 key state %v, want invalid", st.State)
	}
}

// TestAmbiguousFailuresSpendAttempts: 5xx answers spend MaxAttempts.
func TestAmbiguousFailuresSpendAttempts(t *testing.T) {
	fail := status(502, "bad gateway")
	up := newScriptedKeys(t, fail, fail, fail, fail, fail)
	pool := scriptedPool(t, up.URL, 5)
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	resp, err := client.Get(up.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 502 || up.total() != 3 {
		t.Fatalf("got %d after %d attempts, want 502 after 3", resp.StatusCode, up.total())
	}
}

// TestRefusalRepeatedIsTheRequests: a bare 403 on two keys is returned
// and strikes neither; a bare 403 that a later key serves strikes the
// refusing key once.
func TestRefusalRepeatedIsTheRequests(t *testing.T) {
	deny := status(403, `{"error":{"message":"You do not have permission to access the File x"}}`)
	up := newScriptedKeys(t, deny, deny, deny, deny, deny)
	pool := scriptedPool(t, up.URL, 5)
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	for range 10 {
		resp, err := client.Get(up.URL + "/v1beta/files/x")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 403 || !strings.Contains(string(b), "permission") {
			t.Fatalf("got %d %q, want the upstream's 403", resp.StatusCode, b)
		}
	}
	if up.total() != 20 {
		t.Errorf("%d attempts for 10 requests, want 20 (two keys each)", up.total())
	}
	st, _ := pool.Stats("svc")
	for _, s := range st {
		if s.State != keypool.StateActive || s.Refusals != 0 {
			t.Errorf("key %s: %v refusals=%d, want active and unstruck", s.ID, s.State, s.Refusals)
		}
	}

	// Only k0 refuses; k1 serves: k0 gets one strike per request, and
	// three requests (the default) confirm it invalid.
	up2 := newScriptedKeys(t, deny, status(200, "ok"), status(200, "ok"))
	pool2 := scriptedPool(t, up2.URL, 3)
	if err := pool2.SetService(keypool.Service{Name: "svc", BaseURL: up2.URL, Selector: &keypool.Ordered{}, MinActiveKeys: 1},
		[]keypool.Key{{ID: "k0", Secret: "sk-k0"}, {ID: "k1", Secret: "sk-k1", Priority: 1}, {ID: "k2", Secret: "sk-k2", Priority: 2}}); err != nil {
		t.Fatal(err)
	}
	client2 := &http.Client{Transport: &Transport{Pool: pool2, Service: "svc"}}
	for i := range 3 {
		resp, err := client2.Get(up2.URL + "/x")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d", i, resp.StatusCode)
		}
		if want := keypool.StateActive; i < 2 && keyStats(t, pool2, "k0").State != want {
			t.Fatalf("k0 left rotation after %d refusals", i+1)
		}
	}
	if st := keyStats(t, pool2, "k0"); st.State != keypool.StateInvalid {
		t.Fatalf("k0 after 3 confirmed refusals: %v, want invalid", st.State)
	}
}

// TestOneProbeAfterCooldownUnderLoad: when a key's cooldown ends, 32
// concurrent requests send exactly one to it (the probe); the rest are
// told no key is available until the probe succeeds.
func TestOneProbeAfterCooldownUnderLoad(t *testing.T) {
	release := make(chan struct{})
	var inProbe atomic.Int64
	up := newScriptedKeys(t, func(w http.ResponseWriter, r *http.Request) {
		inProbe.Add(1)
		<-release
		io.WriteString(w, "ok")
	})
	clock := newClock()
	pool, _ := keypool.New(keypool.Config{Now: clock.Now})
	_ = pool.SetService(keypool.Service{Name: "svc", BaseURL: up.URL}, []keypool.Key{{ID: "k0", Secret: "sk-k0"}})
	pool.Report("svc", "k0", keypool.Outcome{Kind: keypool.RateLimited, RetryAfter: 30 * time.Second})
	clock.Advance(time.Minute)
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	var wg sync.WaitGroup
	var noKey atomic.Int64
	probeDone := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(probeDone)
		resp, err := client.Get(up.URL + "/x")
		if err == nil {
			resp.Body.Close()
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for inProbe.Load() == 0 {
		if time.Now().After(deadline) {
			close(release)
			t.Fatal("the probe never reached the upstream")
		}
		runtime.Gosched()
	}
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := client.Get(up.URL + "/x")
			if errors.Is(err, keypool.ErrNoKeyAvailable) {
				noKey.Add(1)
			}
		}()
	}
	// Wait for the 32 to be answered while the probe is held.
	for noKey.Load() < 32 {
		if time.Now().After(deadline) {
			close(release)
			wg.Wait()
			t.Fatalf("only %d of 32 requests were turned away during the probe; upstream hits %d", noKey.Load(), up.hits[0].Load())
		}
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	<-probeDone
	if n := up.hits[0].Load(); n != 1 {
		t.Fatalf("%d requests reached the key right after its cooldown, want 1 (the probe)", n)
	}
	if st := keyStats(t, pool, "k0"); st.State != keypool.StateActive {
		t.Fatalf("after a good probe: %v", st.State)
	}
}

// TestLastingRefusalsFollowTheRequest: a 401 (or a quota refusal with no
// reset) takes a key out of rotation only when the request's fate says it
// is about the key. An endpoint that answers 401 to every key — the
// request's doing — penalises no key however often it is called; a
// revoked key among healthy ones is marked invalid by the request that a
// healthy key then serves; a service's only key is marked on its own word.
func TestLastingRefusalsFollowTheRequest(t *testing.T) {
	unauth := status(401, `{"error":{"message":"this endpoint needs OAuth"}}`)
	spent := status(402, `{"error":{"message":"payment required"}}`)
	for _, tc := range []struct {
		name  string
		deny  func(w http.ResponseWriter, r *http.Request)
		code  int
		state keypool.State
	}{{"401", unauth, 401, keypool.StateInvalid}, {"402", spent, 402, keypool.StateExhausted}} {
		t.Run(tc.name+" from every key", func(t *testing.T) {
			up := newScriptedKeys(t, tc.deny, tc.deny, tc.deny, tc.deny, tc.deny)
			pool := scriptedPool(t, up.URL, 5)
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
			for range 10 {
				resp, err := client.Get(up.URL + "/oauth-only")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != tc.code {
					t.Fatalf("got %d, want the upstream's own answer", resp.StatusCode)
				}
			}
			if up.total() != 20 {
				t.Errorf("%d attempts for 10 requests, want 20 (two keys each)", up.total())
			}
			st, _ := pool.Stats("svc")
			for _, s := range st {
				if s.State != keypool.StateActive {
					t.Errorf("key %s: %v, want active: the refusal followed the request", s.ID, s.State)
				}
			}
		})
		t.Run(tc.name+" from one key", func(t *testing.T) {
			up := newScriptedKeys(t, tc.deny, status(200, "ok"), status(200, "ok"))
			pool := scriptedPool(t, up.URL, 3)
			if err := pool.SetService(keypool.Service{Name: "svc", BaseURL: up.URL, Selector: &keypool.Ordered{}},
				[]keypool.Key{{ID: "k0", Secret: "sk-k0"}, {ID: "k1", Secret: "sk-k1", Priority: 1}, {ID: "k2", Secret: "sk-k2", Priority: 2}}); err != nil {
				t.Fatal(err)
			}
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", MaxAttempts: 1}}
			resp, err := client.Get(up.URL + "/x")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("got %d, want 200 from the next key", resp.StatusCode)
			}
			if st := keyStats(t, pool, "k0"); st.State != tc.state {
				t.Errorf("k0: %v, want %v", st.State, tc.state)
			}
			for _, id := range []string{"k1", "k2"} {
				if st := keyStats(t, pool, id); st.State != keypool.StateActive {
					t.Errorf("%s: %v, want active", id, st.State)
				}
			}
		})
		t.Run(tc.name+" from the only key", func(t *testing.T) {
			up := newScriptedKeys(t, tc.deny)
			pool := scriptedPool(t, up.URL, 1)
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
			resp, err := client.Get(up.URL + "/x")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if st := keyStats(t, pool, "k0"); st.State != tc.state {
				t.Errorf("k0: %v, want %v: no other key could contradict it", st.State, tc.state)
			}
		})
	}
}
