package proxy

import (
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
