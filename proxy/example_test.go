package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/proxy"
)

// A client whose requests carry pooled keys: the first key is rate-limited,
// so the request is retried on the second.
func ExampleTransport() {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "Bearer sk-first-key-000000" {
			w.Header().Set("Retry-After", "30")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		fmt.Fprintf(w, "hello from %s", r.URL.Path)
	}))
	defer upstream.Close()

	pool, _ := keypool.New(keypool.Config{})
	_ = pool.SetService(keypool.Service{Name: "api", BaseURL: upstream.URL, Auth: keypool.Bearer, Selector: &keypool.Ordered{}},
		[]keypool.Key{
			{ID: "first", Secret: "sk-first-key-000000", Priority: 0},
			{ID: "second", Secret: "sk-second-key-00000", Priority: 1},
		})
	client := &http.Client{Transport: &proxy.Transport{Pool: pool, Service: "api"}}

	resp, err := client.Get("/v1/models") // relative: resolved against the base URL
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.StatusCode, string(body), "by key", resp.Header.Get(proxy.HeaderKeyID))
	// Output: 200 hello from /v1/models by key second
}
