package proxy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/keypool/keypool"
)

// TestStalledErrorBodyIsCut: an upstream that sends an error status and
// part of its body, then nothing, held the client until the overall
// deadline (30 min by default): the service's idle timeout bounded only
// the bodies of successful answers, not the read that classifies an error
// answer, the copy kept while another key is tried, or its scrub. Every
// read of an answer now waits at most the idle timeout.
func TestStalledErrorBodyIsCut(t *testing.T) {
	const idle = 150 * time.Millisecond
	for _, status := range []int{401, 403, 404, 429, 500} {
		for _, keys := range [][]string{{"good"}, {"bad", "good"}} {
			t.Run(fmt.Sprintf("%d/%d keys", status, len(keys)), func(t *testing.T) {
				release := make(chan struct{})
				up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
					w.Header().Set("Content-Length", "1000")
					w.WriteHeader(status)
					io.WriteString(w, `{"error":{"message":"x`)
					w.(http.Flusher).Flush()
					<-release
				})
				t.Cleanup(func() { close(release) })
				p, err := keypool.New(keypool.Config{Now: newClock().Now})
				if err != nil {
					t.Fatal(err)
				}
				var ks []keypool.Key
				for i, id := range keys {
					ks = append(ks, keypool.Key{ID: id, Secret: keypool.Secret(map[string]string{"bad": badSecret, "good": goodSecret}[id]), Priority: i})
				}
				if err := p.SetService(keypool.Service{Name: "svc", BaseURL: up.URL, Selector: &keypool.Ordered{}, IdleTimeout: idle}, ks); err != nil {
					t.Fatal(err)
				}
				client := &http.Client{Transport: &Transport{Pool: p, Service: "svc"}}
				done := make(chan error, 1)
				start := time.Now()
				go func() {
					resp, err := client.Get(up.URL + "/x")
					if err == nil {
						_, err = io.ReadAll(resp.Body)
						resp.Body.Close()
						if err == nil {
							err = fmt.Errorf("status %d: the truncated body ended cleanly", resp.StatusCode)
						}
					}
					done <- err
				}()
				select {
				case err := <-done:
					if d := time.Since(start); d > 2*time.Second {
						t.Fatalf("took %v (%v)", d, err)
					}
					t.Logf("ended after %v: %v", time.Since(start).Round(time.Millisecond), err)
				case <-time.After(3 * time.Second):
					t.Fatalf("a stalled %d body held the client past 3 s (idle timeout %v)", status, idle)
				}
			})
		}
	}
}

// TestCanceledRefusalPenalisesNoKey: an upstream answers 401 to every key
// for some request (a refusal that follows the request). A client that
// goes away while the first key's 401 is read stopped the request before
// a second key could show that: the 401 was applied on its own, and one
// canceled request per key took every key of the pool out of rotation.
func TestCanceledRefusalPenalisesNoKey(t *testing.T) {
	sent := make(chan struct{}, 4)
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"error":{"message":"this endpoint needs`)
		w.(http.Flusher).Flush()
		sent <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(func() { close(release) })
	pool := newPool(t, newClock(), up.URL, keypool.Bearer)
	headers := make(chan struct{}, 4)
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := http.DefaultTransport.RoundTrip(r)
		headers <- struct{}{}
		return resp, err
	})
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc", Base: base}}
	for range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", up.URL+"/needs-oauth", nil)
			resp, err := client.Do(req)
			if err == nil {
				_, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
			errc <- err
		}()
		waitFor(t, sent, "the 401 to be sent")
		waitFor(t, headers, "the 401's headers to reach the transport")
		cancel()
		waitFor(t, errc, "the client to return")
	}
	for _, id := range []string{"bad", "good"} {
		if st := keyStats(t, pool, id); st.State != keypool.StateActive || st.InFlight != 0 {
			t.Errorf("key %s after canceled requests: %s, %d in flight", id, st.State, st.InFlight)
		}
	}
}

// TestCanceledDuringFailoverPenalisesNoKey: the first key's 401 awaits the
// request's fate while a second key is tried; a client that goes away
// then confirms nothing.
func TestCanceledDuringFailoverPenalisesNoKey(t *testing.T) {
	second := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		if key == "bad" {
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":{"message":"no"}}`)
			return
		}
		close(second)
		<-r.Context().Done()
	})
	pool := newPool(t, newClock(), up.URL, keypool.Bearer)
	client := &http.Client{Transport: &Transport{Pool: pool, Service: "svc"}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", up.URL+"/x", nil)
		_, err := client.Do(req)
		errc <- err
	}()
	waitFor(t, second, "the second key's attempt")
	cancel()
	waitFor(t, errc, "the client to return")
	if st := keyStats(t, pool, "bad"); st.State != keypool.StateActive {
		t.Errorf("the first key after a canceled failover: %s", st.State)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
