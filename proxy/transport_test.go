package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/keypool/keypool"
)

func TestTransportInjectsKey(t *testing.T) {
	tests := []struct {
		scheme string
		check  func(r *http.Request) string // returns what carried the key
	}{
		{"bearer", func(r *http.Request) string { return r.Header.Get("Authorization") }},
		{"x-api-key", func(r *http.Request) string { return r.Header.Get("X-Api-Key") }},
		{"xi-api-key", func(r *http.Request) string { return r.Header.Get("Xi-Api-Key") }},
		{"authorization-token", func(r *http.Request) string { return r.Header.Get("Authorization") }},
		{"query-param", func(r *http.Request) string { return r.URL.Query().Get("api_key") }},
		{"header:x-goog-api-key", func(r *http.Request) string { return r.Header.Get("X-Goog-Api-Key") }},
		{"query:key", func(r *http.Request) string { return r.URL.Query().Get("key") }},
	}
	want := map[string]string{
		"bearer": "Bearer " + goodSecret, "authorization-token": "Token " + goodSecret,
	}
	for _, tt := range tests {
		t.Run(tt.scheme, func(t *testing.T) {
			got := make(chan [3]string, 1)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				got <- [3]string{tt.check(r), r.Header.Get("Cartesia-Version"), r.URL.Query().Get("q")}
			}))
			defer srv.Close()
			auth, err := keypool.ParseAuthScheme(tt.scheme)
			if err != nil {
				t.Fatal(err)
			}
			pool, _ := keypool.New(keypool.Config{})
			pool.SetService(keypool.Service{Name: "svc", BaseURL: srv.URL, Auth: auth,
				Headers: map[string]string{"Cartesia-Version": "2024-06-10"}},
				[]keypool.Key{{ID: "good", Secret: goodSecret}})
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
			req, _ := http.NewRequest("GET", srv.URL+"/v1/x?q=1", nil)
			req.Header.Set("Cartesia-Version", "client-version")
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			g := <-got
			w := want[tt.scheme]
			if w == "" {
				w = goodSecret
			}
			if g[0] != w {
				t.Errorf("key arrived as %q, want %q", g[0], w)
			}
			if g[1] != "2024-06-10" {
				t.Errorf("proxy header = %q, want the service's value", g[1])
			}
			if g[2] != "1" {
				t.Errorf("query q = %q", g[2])
			}
			if id := resp.Header.Get(HeaderKeyID); id != "good" {
				t.Errorf("%s = %q", HeaderKeyID, id)
			}
			// The caller's request is untouched.
			if req.Header.Get("Cartesia-Version") != "client-version" || req.URL.RawQuery != "q=1" || len(req.Header) != 1 {
				t.Errorf("caller's request was modified: %v %q", req.Header, req.URL.RawQuery)
			}
			if resp.Request.URL.String() != req.URL.String() {
				t.Errorf("resp.Request.URL = %s, want the caller's", resp.Request.URL)
			}
		})
	}
}

// failScripts script the first answer of the "bad" key; later ones succeed.
var failScripts = []struct {
	name  string
	fail  func(w http.ResponseWriter, now time.Time)
	state keypool.State
	wait  time.Duration // the cooldown the upstream asked for
}{
	{"429 retry-after seconds", func(w http.ResponseWriter, now time.Time) {
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(429)
	}, keypool.StateCooling, 30 * time.Second},
	{"429 retry-after http-date", func(w http.ResponseWriter, now time.Time) {
		w.Header().Set("Retry-After", now.Add(60*time.Second).Format(http.TimeFormat))
		w.WriteHeader(429)
	}, keypool.StateCooling, 60 * time.Second},
	{"429 retry-after-ms", func(w http.ResponseWriter, now time.Time) {
		w.Header().Set("Retry-After-Ms", "20000")
		w.WriteHeader(429)
	}, keypool.StateCooling, 20 * time.Second},
	{"429 x-ratelimit-reset-requests", func(w http.ResponseWriter, now time.Time) {
		w.Header().Set("X-Ratelimit-Reset-Requests", "1m30s")
		w.WriteHeader(429)
	}, keypool.StateCooling, 90 * time.Second},
	{"401", func(w http.ResponseWriter, now time.Time) {
		w.WriteHeader(401)
		io.WriteString(w, `{"error":{"message":"Incorrect API key provided"}}`)
	}, keypool.StateInvalid, 0},
	{"403 invalid_api_key", func(w http.ResponseWriter, now time.Time) {
		w.WriteHeader(403)
		io.WriteString(w, `{"error":{"code":"invalid_api_key"}}`)
	}, keypool.StateInvalid, 0},
	// A bare 403 another key then served: one strike, still active.
	{"bare 403", func(w http.ResponseWriter, now time.Time) { w.WriteHeader(403) }, keypool.StateActive, 0},
	{"402", func(w http.ResponseWriter, now time.Time) { w.WriteHeader(402) }, keypool.StateExhausted, 0},
	{"429 insufficient_quota", func(w http.ResponseWriter, now time.Time) {
		w.WriteHeader(429)
		io.WriteString(w, `{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}`)
	}, keypool.StateExhausted, 0},
	{"500", func(w http.ResponseWriter, now time.Time) { w.WriteHeader(500) }, keypool.StateActive, 0},
	{"connection reset", func(w http.ResponseWriter, now time.Time) {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}, keypool.StateActive, 0},
}

func TestTransportFailover(t *testing.T) {
	payload := bytes.Repeat([]byte(`{"model":"x","messages":["héllo"]}`+"\n"), 100)
	bodies := []struct {
		name string
		make func() io.Reader
	}{
		{"getbody", func() io.Reader { return bytes.NewReader(payload) }},
		{"buffered", func() io.Reader { return iotest.HalfReader(bytes.NewReader(payload)) }}, // no GetBody
	}
	for _, fs := range failScripts {
		for _, bm := range bodies {
			t.Run(fs.name+"/"+bm.name, func(t *testing.T) {
				clock := newClock()
				up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
					if key == "bad" && n == 1 {
						fs.fail(w, clock.Now())
						return
					}
					okScript(w, r, key, n)
				})
				pool := newPool(t, clock, up.URL, keypool.Bearer)
				client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
				req, _ := http.NewRequest("POST", up.URL+"/v1/chat", bm.make())
				if (req.GetBody != nil) != (bm.name == "getbody") {
					t.Fatalf("GetBody set = %v", req.GetBody != nil)
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != "ok good" || resp.Header.Get(HeaderKeyID) != "good" {
					t.Fatalf("got %d %q key %q, want 200 from good", resp.StatusCode, b, resp.Header.Get(HeaderKeyID))
				}
				hits := up.Hits()
				if len(hits) < 2 {
					t.Fatalf("%d upstream hits, want ≥ 2", len(hits))
				}
				for _, h := range hits {
					if !bytes.Equal(h.body, payload) {
						t.Errorf("key %s received %d bytes, want the %d-byte body byte-identical", h.key, len(h.body), len(payload))
					}
				}
				st := keyStats(t, pool, "bad")
				if st.State != fs.state {
					t.Errorf("bad key state = %s (%s), want %s", st.State, st.Reason, fs.state)
				}
				switch {
				case fs.name == "bare 403":
					if st.Failures != 0 || st.Refusals != 1 {
						t.Errorf("bad key failures = %d refusals = %d, want 0 and 1", st.Failures, st.Refusals)
					}
				case fs.state == keypool.StateActive && st.Failures != 1:
					t.Errorf("bad key failures = %d, want 1", st.Failures)
				}
				if st.InFlight != 0 || keyStats(t, pool, "good").InFlight != 0 {
					t.Errorf("in flight after the requests: %d", st.InFlight)
				}

				if fs.state == keypool.StateActive {
					return // one failure does not trip the breaker
				}
				// The failed key is not used again before it may be.
				before := up.Count("bad")
				for range 5 {
					resp, err := client.Get(up.URL + "/v1/again")
					if err != nil {
						t.Fatal(err)
					}
					resp.Body.Close()
				}
				if up.Count("bad") != before {
					t.Fatalf("bad key used again right away")
				}
				switch fs.state {
				case keypool.StateCooling:
					if got := st.Until.Sub(clock.Now()); got < fs.wait || got > fs.wait+fs.wait/10+time.Second {
						t.Errorf("cooldown %s, want about %s", got, fs.wait)
					}
					clock.Advance(fs.wait - time.Second)
					resp, _ := client.Get(up.URL + "/v1/again")
					resp.Body.Close()
					if up.Count("bad") != before {
						t.Fatalf("bad key used before its Retry-After")
					}
					clock.Advance(fs.wait/10 + 2*time.Second) // past the jitter
					resp, _ = client.Get(up.URL + "/v1/again")
					resp.Body.Close()
					if up.Count("bad") != before+1 || resp.Header.Get(HeaderKeyID) != "bad" {
						t.Fatalf("bad key not back after its Retry-After")
					}
				case keypool.StateInvalid:
					clock.Advance(24 * time.Hour)
					for range 5 {
						resp, _ := client.Get(up.URL + "/v1/again")
						resp.Body.Close()
					}
					if up.Count("bad") != before {
						t.Fatalf("invalid key used again")
					}
				}
			})
		}
	}
}

func TestTransportReturnsLastUpstreamAnswer(t *testing.T) {
	tests := []struct {
		name        string
		maxAttempts int
		status      int
		wantHits    int
		wantKey     string
	}{
		{"every key 429", 0, 429, 2, "good"},
		{"every key 500", 0, 500, 2, "good"},
		{"one attempt on failures", 1, 500, 1, "bad"},
		{"key refusals spend no attempt", 1, 401, 2, "good"},
		// The same bare 403 on a second key is the request's: returned.
		{"every key 403", 0, 403, 2, "good"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
				w.Header().Set("Retry-After", "7")
				w.WriteHeader(tt.status)
				io.WriteString(w, "upstream says no to "+key)
			})
			pool := newPool(t, newClock(), up.URL, keypool.Bearer)
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", MaxAttempts: tt.maxAttempts}}
			resp, err := client.Post(up.URL+"/x", "text/plain", strings.NewReader("hi"))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.status || string(b) != "upstream says no to "+tt.wantKey || resp.Header.Get(HeaderKeyID) != tt.wantKey {
				t.Errorf("got %d %q key %q", resp.StatusCode, b, resp.Header.Get(HeaderKeyID))
			}
			if len(up.Hits()) != tt.wantHits {
				t.Errorf("%d hits, want %d", len(up.Hits()), tt.wantHits)
			}
		})
	}
}

func TestTransportNoKeyError(t *testing.T) {
	up := newUpstream(t, okScript)
	clock := newClock()
	pool := newPool(t, clock, up.URL, keypool.Bearer)
	pool.SetKeyState("svc", "bad", keypool.StateInvalid, time.Time{}, "test")
	pool.SetKeyState("svc", "good", keypool.StateCooling, clock.Now().Add(42*time.Second), "test")
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	_, err := client.Post(up.URL+"/x", "text/plain", strings.NewReader("hi"))
	var nk *keypool.NoKeyError
	if !errors.As(err, &nk) || !errors.Is(err, keypool.ErrNoKeyAvailable) {
		t.Fatalf("err = %v, want a *keypool.NoKeyError", err)
	}
	if nk.RetryAfter != 42*time.Second {
		t.Errorf("RetryAfter = %s, want 42s", nk.RetryAfter)
	}
	if len(up.Hits()) != 0 {
		t.Errorf("upstream was called")
	}

	_, err = (&http.Client{Transport: &Transport{Pool: pool, Service: "nope"}}).Get(up.URL)
	if !errors.Is(err, keypool.ErrUnknownService) {
		t.Errorf("unknown service: err = %v", err)
	}
}

func TestTransportNoRetry(t *testing.T) {
	big := strings.Repeat("x", 100)
	tests := []struct {
		name   string
		status int
		body   func() io.Reader
		max    int64
		state  keypool.State
	}{
		{"client error 400", 400, func() io.Reader { return strings.NewReader("{}") }, 0, keypool.StateActive},
		{"client error 404", 404, func() io.Reader { return strings.NewReader("{}") }, 0, keypool.StateActive},
		{"body over MaxBufferedBody", 429, func() io.Reader { return iotest.HalfReader(strings.NewReader(big)) }, 10, keypool.StateCooling},
		{"buffering disabled", 500, func() io.Reader { return iotest.HalfReader(strings.NewReader(big)) }, -1, keypool.StateActive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
				w.WriteHeader(tt.status)
			})
			pool := newPool(t, newClock(), up.URL, keypool.Bearer)
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", MaxBufferedBody: tt.max}}
			resp, err := client.Post(up.URL+"/x", "text/plain", tt.body())
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Errorf("status %d", resp.StatusCode)
			}
			hits := up.Hits()
			if len(hits) != 1 || hits[0].key != "bad" {
				t.Fatalf("hits = %d, want one on bad", len(hits))
			}
			if want := tt.body(); want != nil {
				w, _ := io.ReadAll(want)
				if !bytes.Equal(hits[0].body, w) {
					t.Errorf("body %q, want %q", hits[0].body, w)
				}
			}
			if st := keyStats(t, pool, "bad"); st.State != tt.state {
				t.Errorf("state %s", st.State)
			}
		})
	}
}

func TestTransportCanceledDoesNotPenalise(t *testing.T) {
	arrived := make(chan struct{})
	gone := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		close(arrived)
		<-r.Context().Done()
		close(gone)
	})
	pool := newPool(t, newClock(), up.URL, keypool.Bearer, "good")
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", up.URL+"/slow", nil)
		_, err := client.Do(req)
		errc <- err
	}()
	waitFor(t, arrived, "the upstream to get the request")
	cancel()
	err := waitFor(t, errc, "the client to return")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
	waitFor(t, gone, "the upstream request to be canceled")
	st := keyStats(t, pool, "good")
	if st.State != keypool.StateActive || st.Failures != 0 || st.InFlight != 0 {
		t.Errorf("key after cancel: state %s failures %d in flight %d", st.State, st.Failures, st.InFlight)
	}
	if len(up.Hits()) != 1 {
		t.Errorf("canceled request was retried")
	}
}

func TestTransportSlowAnswers(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		if key == "bad" {
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		okScript(w, r, key, n)
	})

	t.Run("attempt timeout fails over", func(t *testing.T) {
		pool := newPool(t, newClock(), up.URL, keypool.Bearer)
		client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", AttemptTimeout: 50 * time.Millisecond}}
		resp, err := client.Get(up.URL + "/x")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.Header.Get(HeaderKeyID) != "good" {
			t.Errorf("served by %q", resp.Header.Get(HeaderKeyID))
		}
		if st := keyStats(t, pool, "bad"); st.Failures != 1 {
			t.Errorf("slow key failures = %d, want 1", st.Failures)
		}
	})
	t.Run("client deadline", func(t *testing.T) {
		pool := newPool(t, newClock(), up.URL, keypool.Bearer, "bad")
		client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", up.URL+"/x", nil)
		_, err := client.Do(req)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		if st := keyStats(t, pool, "bad"); st.Failures != 0 || st.InFlight != 0 {
			t.Errorf("key penalised for the client's deadline: %+v", st)
		}
	})
}

func TestTransportReleasesOnBodyEnd(t *testing.T) {
	for _, end := range []string{"eof", "close"} {
		t.Run(end, func(t *testing.T) {
			more := make(chan struct{})
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
				io.WriteString(w, "first\n")
				w.(http.Flusher).Flush()
				select {
				case <-more:
				case <-r.Context().Done():
				}
				io.WriteString(w, "second\n")
			})
			pool := newPool(t, newClock(), up.URL, keypool.Bearer, "good")
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
			resp, err := client.Get(up.URL + "/stream")
			if err != nil {
				t.Fatal(err)
			}
			if st := keyStats(t, pool, "good"); st.InFlight != 1 {
				t.Errorf("in flight while streaming = %d, want 1", st.InFlight)
			}
			if end == "eof" {
				close(more)
				b, _ := io.ReadAll(resp.Body)
				if string(b) != "first\nsecond\n" {
					t.Errorf("body %q", b)
				}
				if st := keyStats(t, pool, "good"); st.InFlight != 0 {
					t.Errorf("in flight after EOF = %d", st.InFlight)
				}
			}
			resp.Body.Close()
			resp.Body.Close() // twice is fine
			if st := keyStats(t, pool, "good"); st.InFlight != 0 || st.State != keypool.StateActive {
				t.Errorf("after close: %+v", st)
			}
			if end == "close" {
				close(more)
			}
		})
	}
}

func TestTransportRelativeURL(t *testing.T) {
	up := newUpstream(t, okScript)
	pool := newPool(t, newClock(), up.URL+"/openai/", keypool.Bearer, "good")
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	resp, err := client.Get("/v1/models?limit=2")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if h := up.Hits(); len(h) != 1 || h[0].uri != "/openai/v1/models?limit=2" || h[0].key != "good" {
		t.Fatalf("hits %+v", h)
	}
}

func TestTransportRedirectNeverCarriesKey(t *testing.T) {
	for _, scheme := range []string{"bearer", "x-api-key", "query-param"} {
		t.Run(scheme, func(t *testing.T) {
			other := newUpstream(t, okScript)
			var up *upstream
			up = newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
				switch r.URL.Path {
				case "/away":
					http.Redirect(w, r, other.URL+"/landing?x=1", http.StatusFound)
				case "/here":
					http.Redirect(w, r, "/landed", http.StatusFound)
				default:
					okScript(w, r, key, n)
				}
			})
			auth, _ := keypool.ParseAuthScheme(scheme)
			pool := newPool(t, newClock(), up.URL, auth, "good")
			client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}

			resp, err := client.Get(up.URL + "/away")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			oh := other.Hits()
			if len(oh) != 1 {
				t.Fatalf("other origin hits = %d", len(oh))
			}
			if oh[0].key != "" || strings.Contains(fmt.Sprint(oh[0].header), goodSecret) || strings.Contains(oh[0].uri, goodSecret) {
				t.Errorf("the key followed a redirect to another origin: %v %s", oh[0].header, oh[0].uri)
			}
			if resp.Header.Get(HeaderKeyID) != "" {
				t.Errorf("foreign answer carries %s", HeaderKeyID)
			}
			if st := keyStats(t, pool, "good"); st.InFlight != 0 || st.Requests != 1 {
				t.Errorf("key stats after redirect: %+v", st)
			}

			resp, err = client.Get(up.URL + "/here")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			h := up.Hits()
			if last := h[len(h)-1]; !strings.HasPrefix(last.uri, "/landed") || last.key != "good" {
				t.Errorf("same-origin redirect: %+v", last)
			}
		})
	}
}

// urlErrorBase fails like a client that reports the full URL.
type urlErrorBase struct{}

func (urlErrorBase) RoundTrip(r *http.Request) (*http.Response, error) {
	return nil, &url.Error{Op: "Get", URL: r.URL.String(), Err: fmt.Errorf("dial %s: connection refused", r.URL)}
}

func TestTransportRedactsErrors(t *testing.T) {
	t.Run("connection refused", func(t *testing.T) {
		dead := httptest.NewServer(http.NotFoundHandler())
		dead.Close()
		pool := newPool(t, newClock(), dead.URL, keypool.QueryParam, "good")
		client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
		_, err := client.Get(dead.URL + "/v1/search?q=a")
		if err == nil {
			t.Fatal("no error")
		}
		if strings.Contains(err.Error(), goodSecret) || strings.Contains(fmt.Sprintf("%+v %#v", err, err), goodSecret) {
			t.Errorf("error leaks the key: %v", err)
		}
		if st := keyStats(t, pool, "good"); st.Failures != 1 {
			t.Errorf("failures = %d", st.Failures)
		}
	})
	t.Run("url.Error from base", func(t *testing.T) {
		pool := newPool(t, newClock(), "https://api.example.com", keypool.QueryParam, "good")
		tr := &Transport{Pool: pool, Service: "svc", Base: urlErrorBase{}}
		req, _ := http.NewRequest("GET", "https://api.example.com/v1/search?q=a", nil)
		_, err := tr.RoundTrip(req)
		var ue *url.Error
		if !errors.As(err, &ue) {
			t.Fatalf("err = %T %v, want a *url.Error", err, err)
		}
		if strings.Contains(err.Error(), goodSecret) || strings.Contains(ue.URL, goodSecret) || strings.Contains(errors.Unwrap(err).Error(), goodSecret) {
			t.Errorf("error leaks the key: %v", err)
		}
		if !strings.Contains(ue.URL, "api_key="+url.QueryEscape(Redacted)) && !strings.Contains(ue.URL, Redacted) {
			t.Errorf("URL not redacted: %s", ue.URL)
		}
	})
}

func TestTransportScrubsSecretFromAnswers(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("X-Echo", "you sent "+goodSecret)
		if r.URL.Path == "/big" {
			w.WriteHeader(400) // unknown length: scrubbed as it streams
			for i := 0; i < 3000; i++ {
				fmt.Fprintf(w, `{"i":%d,"key":"%s"}`+"\n", i, goodSecret)
			}
			return
		}
		w.WriteHeader(400)
		fmt.Fprintf(w, `{"error":{"message":"bad request with key %s"}}`, goodSecret)
	})
	pool := newPool(t, newClock(), up.URL, keypool.Bearer, "good")
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	for _, path := range []string{"/small", "/big"} {
		t.Run(path, func(t *testing.T) {
			resp, err := client.Get(up.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), goodSecret) || !strings.Contains(string(b), Redacted) {
				t.Errorf("body not scrubbed: %.200s", b)
			}
			if resp.Header.Get("X-Echo") != "you sent "+Redacted {
				t.Errorf("header not scrubbed: %q", resp.Header.Get("X-Echo"))
			}
			if path == "/small" && resp.ContentLength != int64(len(b)) {
				t.Errorf("ContentLength %d, body %d", resp.ContentLength, len(b))
			}
		})
	}
}

func TestScrubReader(t *testing.T) {
	secret := "sk-abcdefgh12345678"
	tests := []struct{ name, in, want string }{
		{"none", "hello world", "hello world"},
		{"one", "a " + secret + " b", "a " + Redacted + " b"},
		{"two adjacent", secret + secret, Redacted + Redacted},
		{"prefix at end", "x sk-abcd", "x sk-abcd"},
		{"near miss", "sk-abcdefgh1234567X", "sk-abcdefgh1234567X"},
		{"overlapping prefix", "sk-sk-abcdefgh12345678", "sk-" + Redacted},
	}
	for _, tt := range tests {
		for _, rd := range []string{"whole", "one byte"} {
			t.Run(tt.name+"/"+rd, func(t *testing.T) {
				var r io.Reader = strings.NewReader(tt.in)
				if rd == "one byte" {
					r = iotest.OneByteReader(r)
				}
				resp := &http.Response{StatusCode: 500, Header: http.Header{}, ContentLength: -1, Body: io.NopCloser(r)}
				scrubBody(resp, secret)
				got, err := io.ReadAll(iotest.OneByteReader(resp.Body))
				if err != nil || string(got) != tt.want {
					t.Errorf("got %q, %v; want %q", got, err, tt.want)
				}
			})
		}
	}
}

func TestTransportOnAttempt(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		if key == "bad" {
			w.WriteHeader(503)
			return
		}
		okScript(w, r, key, n)
	})
	pool := newPool(t, newClock(), up.URL, keypool.Bearer)
	var got []AttemptInfo
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", OnAttempt: func(a AttemptInfo) { got = append(got, a) }}}
	resp, err := client.Get(up.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if len(got) != 2 || got[0].KeyID != "bad" || got[0].Status != 503 || !got[0].Retry || got[0].Outcome.Kind != keypool.Failure ||
		got[1].KeyID != "good" || got[1].Attempt != 2 || got[1].Retry || got[1].Outcome.Kind != keypool.OK {
		t.Errorf("attempts %+v", got)
	}
}

func TestTransportContextOptions(t *testing.T) {
	up := newUpstream(t, okScript)
	pool, _ := keypool.New(keypool.Config{})
	pool.SetService(keypool.Service{Name: "other", BaseURL: up.URL, Selector: &keypool.Sticky{}}, []keypool.Key{
		{ID: "bad", Secret: badSecret, Labels: map[string]string{"feature": "image"}},
		{ID: "good", Secret: goodSecret},
	})
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	for range 3 {
		ctx := WithFeature(WithService(context.Background(), "other"), "image")
		req, _ := http.NewRequestWithContext(WithAffinity(ctx, "user-1"), "GET", up.URL, nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.Header.Get(HeaderKeyID) != "bad" {
			t.Errorf("feature key not picked: %q", resp.Header.Get(HeaderKeyID))
		}
	}
}
