package proxy

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keypool/keypool"
)

// A client cannot take keys out of rotation by sending text that an
// upstream echoes back in its 400 error.
func TestEchoedErrorTextDoesNotChangeKeyState(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"error":{"message":"Invalid value: %q"}}`, b)
	}))
	defer up.Close()
	p, _ := keypool.New(keypool.Config{})
	var keys []keypool.Key
	for i := range 3 {
		keys = append(keys, keypool.Key{ID: fmt.Sprint("k", i), Secret: keypool.Secret(fmt.Sprintf("sk-secret-key-%04d", i))})
	}
	if err := p.SetService(keypool.Service{Name: "svc", BaseURL: up.URL}, keys); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &Transport{Pool: p, Service: "svc"}}
	for _, body := range []string{"invalid api key", "API_KEY_INVALID", "insufficient_quota", `{"code":"insufficient_quota"}`} {
		resp, err := c.Post(up.URL+"/v1/chat", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.State != keypool.StateActive {
			t.Errorf("key %s is %v after client errors", s.ID, s.State)
		}
	}
}
