package server_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// keysFive are five distinct upstream keys.
var keysFive = []string{
	"sk-five-111111111111111111111111111111111111",
	"sk-five-222222222222222222222222222222222222",
	"sk-five-333333333333333333333333333333333333",
	"sk-five-444444444444444444444444444444444444",
	"sk-five-555555555555555555555555555555555555",
}

// keyStates returns each key's state as GET /admin/keys/{id} shows it.
func keyStates(k *kp, ids []string) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		m := k.mustAdmin("GET", "/admin/keys/"+id, nil, 200)
		out[i], _ = m["state"].(string)
	}
	return out
}

// TestRequestRefusalKillsNoKey is the attack of issue 16 item 1: an
// upstream that refuses the request (a Gemini file the key may not read)
// with a bare 403 on every key must not take any key out of rotation.
// Before the fix two requests left all five keys invalid.
func TestRequestRefusalKillsNoKey(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1beta/files/") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(403)
			_, _ = io.WriteString(w, `{"error":{"message":"You do not have permission to access the File x"}}`)
			return
		}
		okJSON(w, r)
	})
	k := startKP(t)
	k.addService("g", up.URL, "header:x-goog-api-key", nil)
	var ids []string
	for _, v := range keysFive {
		ids = append(ids, k.addKey("g", v, nil))
	}
	tok := k.addToken(k.addTeam("t", nil), nil)
	for i := range 10 {
		code, m, _ := k.do("GET", "/v1/g/v1beta/files/x", tok, nil)
		if code != 403 {
			t.Fatalf("request %d: %d %v, want the upstream's 403", i, code, m)
		}
	}
	for i, st := range keyStates(k, ids) {
		if st != "active" {
			t.Errorf("key %d is %q after request-refusals, want active", i, st)
		}
	}
	// Each request tried at most two keys: the refusal repeated on the
	// second is the request's.
	if n := len(up.seen()); n > 20 {
		t.Errorf("10 refused requests made %d upstream attempts, want ≤ 20", n)
	}
	if code, m, _ := k.do("GET", "/v1/g/v1beta/models", tok, nil); code != 200 {
		t.Errorf("pool dead after refusals: %d %v", code, m)
	}
}

// TestFailoverUsesEveryKey is issue 8's scenario: five keys (429 with
// Retry-After 30, 401, 500, two healthy), 200 requests from 8 clients:
// every one is served with the healthy keys' body. Before the fix the
// first request got the upstream's 500 (MaxAttempts spent on the three
// bad keys).
func TestFailoverUsesEveryKey(t *testing.T) {
	const body = `{"id":"x","object":"chat.completion","choices":[]}`
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch bearerKey(r.Header) {
		case keysFive[0]:
			w.Header().Set("Retry-After", "30")
			w.WriteHeader(429)
			_, _ = io.WriteString(w, `{"error":{"message":"slow down","type":"rate_limit_exceeded"}}`)
		case keysFive[1]:
			w.WriteHeader(401)
			_, _ = io.WriteString(w, `{"error":{"message":"bad key","code":"invalid_api_key"}}`)
		case keysFive[2]:
			w.WriteHeader(500)
			_, _ = io.WriteString(w, `{"error":{"message":"boom"}}`)
		default:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, body)
		}
	})
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", nil)
	for _, v := range keysFive {
		k.addKey("openai", v, nil)
	}
	tok := k.addToken(k.addTeam("t", nil), nil)

	const clients, total = 8, 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	next := make(chan int, total)
	for i := range total {
		next <- i
	}
	close(next)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions", strings.NewReader(`{"model":"m"}`))
				req.Header.Set("Authorization", "Bearer "+tok)
				req.Header.Set("Content-Type", "application/json")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("request %d: %v", i, err))
					mu.Unlock()
					continue
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || !bytes.Equal(got, []byte(body)) {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("request %d: %d %s", i, resp.StatusCode, got))
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d requests failed; first: %s", len(failures), total, failures[0])
	}
}

// TestServiceKeyPolicyAdmin: the key-policy fields go through the admin
// API with validation, reach the pool, and are shown.
func TestServiceKeyPolicyAdmin(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("svc", up.URL, "bearer", map[string]any{
		"retry_after_cap": 600, "confirm_refusals": 2, "min_active_keys": 1, "max_ejection_percent": 40,
	})
	m := k.mustAdmin("GET", "/admin/services/svc", nil, 200)
	if m["retry_after_cap"] != 600.0 || m["confirm_refusals"] != 2.0 || m["min_active_keys"] != 1.0 || m["max_ejection_percent"] != 40.0 {
		t.Fatalf("GET service: %v", m)
	}
	eventually(t, "the pool to load the policy", func() bool {
		ps, ok := k.srv.Pool().Service("svc")
		return ok && ps.RetryAfterCap.Seconds() == 600 && ps.ConfirmRefusals == 2 && ps.MinActiveKeys == 1 && ps.MaxEjectionPercent == 40
	})
	k.mustAdmin("PATCH", "/admin/services/svc", map[string]any{"max_ejection_percent": 100, "retry_after_cap": nil}, 200)
	m = k.mustAdmin("GET", "/admin/services/svc", nil, 200)
	if m["max_ejection_percent"] != 100.0 || m["retry_after_cap"] != nil || m["confirm_refusals"] != 2.0 {
		t.Fatalf("after PATCH: %v", m)
	}
	for _, tc := range []struct {
		body map[string]any
		want string
	}{
		{map[string]any{"max_ejection_percent": 101}, "max_ejection_percent must be 0 to 100"},
		{map[string]any{"retry_after_cap": -1}, "retry_after_cap must be 0 to 604800"},
		{map[string]any{"confirm_refusals": 1000}, "confirm_refusals must be 0 to 100"},
		{map[string]any{"min_active_keys": -2}, "min_active_keys"},
		{map[string]any{"retry_after_cap": "1h"}, "retry_after_cap"},
		{map[string]any{"retry_after_caps": 5}, "retry_after_caps"},
	} {
		code, m, _ := k.do("PATCH", "/admin/services/svc", k.admin, tc.body)
		e, _ := m["error"].(map[string]any)
		if msg, _ := e["message"].(string); code != 400 || !strings.Contains(msg, tc.want) {
			t.Errorf("PATCH %v = %d %v, want 400 mentioning %q", tc.body, code, m, tc.want)
		}
	}
	// Nothing half-written.
	m = k.mustAdmin("GET", "/admin/services/svc", nil, 200)
	if m["max_ejection_percent"] != 100.0 || m["confirm_refusals"] != 2.0 {
		t.Fatalf("a refused PATCH changed the service: %v", m)
	}
}

// TestRetryAfterHonouredUpToCap is issue 16 item 5: Retry-After above
// 300 s was thrown away (the key cooled ~1 s). Now 3600 s cools the key an
// hour, and 86400 s is clamped to the service's retry_after_cap.
func TestRetryAfterHonouredUpToCap(t *testing.T) {
	for _, tc := range []struct {
		name, retryAfter string
		capSeconds       int
		want             time.Duration
	}{
		{"301 s", "301", 0, 301 * time.Second},
		{"3600 s", "3600", 0, time.Hour},
		{"86400 s clamped to the default cap", "86400", 0, time.Hour},
		{"86400 s clamped to the service's cap", "86400", 7200, 2 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Retry-After", tc.retryAfter)
				w.WriteHeader(429)
			})
			k := startKP(t)
			extra := map[string]any{}
			if tc.capSeconds > 0 {
				extra["retry_after_cap"] = tc.capSeconds
			}
			k.addService("svc", up.URL, "bearer", extra)
			id := k.addKey("svc", keyA, nil)
			tok := k.addToken(k.addTeam("t", nil), nil)
			if code, _, _ := k.do("GET", "/v1/svc/x", tok, nil); code != 429 {
				t.Fatalf("status %d, want the upstream's 429", code)
			}
			m := k.mustAdmin("GET", "/admin/keys/"+id, nil, 200)
			until, err := time.Parse(time.RFC3339Nano, fmt.Sprint(m["cooldown_until"]))
			if err != nil || m["state"] != "cooling" {
				t.Fatalf("key %v, want cooling with cooldown_until", m)
			}
			if d := time.Until(until); d < tc.want-time.Minute || d > tc.want+tc.want/10+time.Second {
				t.Fatalf("cooling for %v, want about %v", d, tc.want)
			}
			code, m, resp := k.do("GET", "/v1/svc/x", tok, nil)
			ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			if code != 429 || time.Duration(ra)*time.Second < tc.want-time.Minute {
				t.Fatalf("next request: %d Retry-After %q %v, want 429 no_key_available about %v", code, resp.Header.Get("Retry-After"), m, tc.want)
			}
		})
	}
}

// TestOutageAnswers503 is issue 16 item 9: in a provider outage at most
// half the keys are ejected; once the rest fail too, clients get a fast
// 503 upstream_unavailable with Retry-After (not 429), while one probe a
// second keeps testing the upstream, and service resumes when it is back.
func TestOutageAnswers503(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	var hits atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if down.Load() {
			w.WriteHeader(503)
			_, _ = io.WriteString(w, `{"error":{"message":"overloaded"}}`)
			return
		}
		okJSON(w, r)
	})
	k := startKP(t)
	k.addService("svc", up.URL, "bearer", nil)
	var ids []string
	for _, v := range keysFive[:4] {
		ids = append(ids, k.addKey("svc", v, nil))
	}
	tok := k.addToken(k.addTeam("t", nil), nil)
	var unavailable int
	for i := range 40 {
		code, m, resp := k.do("GET", "/v1/svc/x", tok, nil)
		switch code {
		case 503:
			e, _ := m["error"].(map[string]any)
			if e["code"] == "upstream_unavailable" {
				unavailable++
				if resp.Header.Get("Retry-After") == "" {
					t.Fatalf("request %d: 503 without Retry-After", i)
				}
			}
		case 429:
			t.Fatalf("request %d: 429 %v during an outage, want 503", i, m)
		}
	}
	if unavailable < 20 {
		t.Errorf("%d of 40 requests got keypool's fast 503, want most", unavailable)
	}
	open := 0
	for _, st := range keyStates(k, ids) {
		if st == "open" {
			open++
		}
	}
	if open != 2 {
		t.Errorf("%d of 4 keys ejected, want 2 (max_ejection_percent 50)", open)
	}
	// 4 keys × 5 failures to trip, plus at most one probe a second.
	if n := hits.Load(); n > 30 {
		t.Errorf("%d upstream attempts for 40 requests in an outage", n)
	}
	if _, m, _ := k.do("GET", "/metrics", "", nil); !strings.Contains(m["_raw"].(string), `keypool_key_holds_total{kind="ejection_cap",service="svc"} 2`) {
		t.Error("holds not counted")
	}
	down.Store(false)
	eventually(t, "service to resume after the outage", func() bool {
		code, _, _ := k.do("GET", "/v1/svc/x", tok, nil)
		return code == 200
	})
}

// TestRefusalBurstKeepsFloor: a burst of 200 concurrent requests from one
// token for a file only key 5's project may read (every other key answers
// a bare 403, key 5 serves it) can confirm refusals on other keys, but
// never take the service below min_active_keys (default: 3 of 5). Each
// kept key is logged and counted.
func TestRefusalBurstKeepsFloor(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1beta/files/") && r.Header.Get("X-Goog-Api-Key") != keysFive[4] {
			w.WriteHeader(403)
			_, _ = io.WriteString(w, `{"error":{"message":"You do not have permission to access the File x"}}`)
			return
		}
		okJSON(w, r)
	})
	k := startKP(t)
	k.addService("g", up.URL, "header:x-goog-api-key", nil)
	var ids []string
	for _, v := range keysFive {
		ids = append(ids, k.addKey("g", v, nil))
	}
	tok := k.addToken(k.addTeam("t", nil), nil)
	var wg sync.WaitGroup
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("GET", k.url+"/v1/g/v1beta/files/x", nil)
			req.Header.Set("Authorization", "Bearer "+tok)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	active := 0
	for _, st := range keyStates(k, ids) {
		if st == "active" {
			active++
		}
	}
	if active < 3 {
		t.Fatalf("%d of 5 keys left in rotation after a refusal burst, want ≥ 3 (the floor)", active)
	}
	if states := keyStates(k, ids); states[4] != "active" {
		t.Fatalf("the serving key is %q", states[4])
	}
	if active == 5 {
		return // no key reached confirm_refusals: nothing to hold
	}
	_, m, _ := k.do("GET", "/metrics", "", nil)
	if active == 3 && !strings.Contains(m["_raw"].(string), `keypool_key_holds_total{kind="floor",service="g"}`) {
		t.Error("floor holds not counted")
	}
}
