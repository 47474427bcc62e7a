package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

const testAdmin = "kpadm_example_admin_token_0123456789"

// TestRegisteredSelectorServesThroughTheAdminAPI runs the example: the
// selector it registers as "free_first" is accepted by the admin API for
// a new service, and the proxy then sends every request with the free
// key while it is available.
func TestRegisteredSelectorServesThroughTheAdminAPI(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		// Which key served, by tier: the proxy scrubs key values from
		// answers, so the upstream names them.
		tier := "paid"
		if r.Header.Get("Authorization") == "Bearer sk-free-1" {
			tier = "free"
		}
		_ = json.NewEncoder(w).Encode(map[string]string{"served_by": tier})
	}))
	defer up.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, ln, options{dataDir: t.TempDir(), openaiKey: "sk-example-not-a-real-key", adminToken: testAdmin})
	}()
	base := "http://" + ln.Addr().String()
	client := &http.Client{Timeout: 5 * time.Second}
	call := func(method, path, token, body string) (int, map[string]any) {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var m map[string]any
		_ = json.Unmarshal(b, &m)
		return resp.StatusCode, m
	}
	// The program's own route beside keypoold's (the listener is open:
	// the request waits until run serves it).
	resp, err := client.Get(base + "/hello")
	if err != nil {
		t.Fatal(err)
	}
	hello, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(hello), "[openai]") {
		t.Fatalf("/hello: %q", hello)
	}

	// A name nobody registered is refused; the registered one is taken.
	if code, m := call("POST", "/admin/services", testAdmin, `{"name":"echo","base_url":"`+up.URL+`","selector":"fastest"}`); code != 400 ||
		!strings.Contains(m["error"].(map[string]any)["message"].(string), "free_first") {
		t.Fatalf("unknown selector: %d %v, want 400 listing free_first", code, m)
	}
	if code, m := call("POST", "/admin/services", testAdmin, `{"name":"echo","base_url":"`+up.URL+`","selector":"free_first"}`); code != 201 || m["selector"] != "free_first" {
		t.Fatalf("create service: %d %v", code, m)
	}
	for _, k := range []string{`{"service":"echo","key_value":"sk-paid-1"}`, `{"service":"echo","key_value":"sk-free-1","labels":{"tier":"free"}}`,
		`{"service":"echo","key_value":"sk-paid-2"}`} {
		if code, m := call("POST", "/admin/keys", testAdmin, k); code != 201 {
			t.Fatalf("add key: %d %v", code, m)
		}
	}
	_, team := call("POST", "/admin/teams", testAdmin, `{"name":"eng"}`)
	_, tok := call("POST", "/admin/tokens", testAdmin, `{"name":"t","team_id":"`+team["id"].(string)+`"}`)
	token, _ := tok["token"].(string)
	if token == "" {
		t.Fatalf("token: %v (team %v)", tok, team)
	}
	for i := range 6 {
		code, m := call("GET", "/v1/echo/anything", token, "")
		if code != 200 || m["served_by"] != "free" {
			t.Fatalf("request %d: %d %v, want 200 served by the free key", i, code, m)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return after cancel")
	}
}
