// Command roundtripper shows keypool as an http.RoundTripper: an
// http.Client whose every request carries a pooled key and fails over to
// another key when one is rate-limited or revoked.
//
// It starts a local stand-in for an upstream API on 127.0.0.1 that
// rate-limits one key and rejects another, so it runs anywhere:
//
//	go run ./examples/roundtripper
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/proxy"
)

func main() {
	if err := run(os.Stdout); err != nil {
		log.Fatal(err)
	}
}

func run(w io.Writer) error {
	// The upstream: key "sk-busy…" is rate-limited, "sk-revoked…" is
	// revoked, "sk-good…" works.
	upstream := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		switch auth := r.Header.Get("Authorization"); {
		case strings.HasPrefix(auth, "Bearer sk-busy"):
			rw.Header().Set("Retry-After", "30")
			http.Error(rw, `{"error":{"message":"rate limited"}}`, http.StatusTooManyRequests)
		case strings.HasPrefix(auth, "Bearer sk-revoked"):
			http.Error(rw, `{"error":{"message":"invalid api key"}}`, http.StatusUnauthorized)
		default:
			body, _ := io.ReadAll(r.Body)
			fmt.Fprintf(rw, `{"echo":%q}`, body)
		}
	}))
	defer upstream.Close()

	pool, err := keypool.New(keypool.Config{})
	if err != nil {
		return err
	}
	err = pool.SetService(keypool.Service{Name: "demo", BaseURL: upstream.URL, Auth: keypool.Bearer, Selector: &keypool.Ordered{}},
		[]keypool.Key{
			{ID: "busy", Secret: "sk-busy-000000000000", Priority: 0},
			{ID: "revoked", Secret: "sk-revoked-000000000", Priority: 1},
			{ID: "good", Secret: "sk-good-000000000000", Priority: 2},
		})
	if err != nil {
		return err
	}

	client := &http.Client{Transport: &proxy.Transport{Pool: pool, Service: "demo"}}
	for i := 1; i <= 3; i++ {
		resp, err := client.Post(upstream.URL+"/v1/echo", "text/plain", strings.NewReader(fmt.Sprintf("request %d", i)))
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Fprintf(w, "%d %s served by key %s\n", resp.StatusCode, body, resp.Header.Get(proxy.HeaderKeyID))
	}
	stats, _ := pool.Stats("demo")
	for _, s := range stats {
		fmt.Fprintf(w, "key %-8s %-8s %s\n", s.ID, s.State, s.Hint)
	}
	return nil
}
