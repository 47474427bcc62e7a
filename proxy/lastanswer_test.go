package proxy

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keypool/keypool"
)

// When the next key cannot even connect, the client gets the earlier
// key's own answer (a 429 with its Retry-After), not a connection error.
func TestEarlierAnswerBeatsLaterConnectionError(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "Bearer sk-busy-000000000000" {
			w.Header().Set("Retry-After", "17")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"message":"slow down"}}`)
			return
		}
		// Any other key: drop the connection.
		hj, _ := w.(http.Hijacker)
		if c, _, err := hj.Hijack(); err == nil {
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}))
	defer up.Close()
	p, _ := keypool.New(keypool.Config{})
	_ = p.SetService(keypool.Service{Name: "svc", BaseURL: up.URL, Selector: &keypool.Ordered{}}, []keypool.Key{
		{ID: "busy", Secret: "sk-busy-000000000000", Priority: 0},
		{ID: "broken", Secret: "sk-broken-0000000000", Priority: 1},
	})
	c := &http.Client{Transport: &Transport{Pool: p, Service: "svc"}}
	resp, err := c.Post(up.URL+"/v1/x", "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatalf("got an error instead of the 429: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "17" || !strings.Contains(string(body), "slow down") {
		t.Fatalf("status %d, Retry-After %q, body %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
}
