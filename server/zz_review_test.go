package server_test

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// 1. Unauthenticated requests put a client-chosen service name into a
// Prometheus label (and the metric cache).
func TestReviewMetricLabelFromUnauthenticatedPath(t *testing.T) {
	k := startKP(t)
	for i := range 5 {
		code, _, _ := k.do("GET", fmt.Sprintf("/v1/attacker-chosen-%d/x", i), "", nil)
		t.Logf("status %d", code)
	}
	_, m, _ := k.do("GET", "/metrics", "", nil)
	raw := m["_raw"].(string)
	n := strings.Count(raw, `service="attacker-chosen-`)
	t.Logf("series with attacker-chosen service labels: %d", n)
	if n > 0 {
		t.Errorf("client-chosen service names reached metric labels (%d series)", n)
	}
}

// 2. models_enabled bypasses.
func TestReviewModelsEnabledBypass(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai", "models_enabled": []string{"gpt-4o-mini"}})
	k.addService("gemini", up.URL, "header:x-goog-api-key", map[string]any{"llm_family": "gemini", "models_enabled": []string{"gemini-2.0-flash"}})
	k.addKey("openai", "sk-review-openai-0123456789", nil)
	k.addKey("gemini", "AIza-review-gemini-0123456789", nil)
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)

	cases := []struct{ name, method, path, body string }{
		{"control: forbidden model", "POST", "/v1/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[]}`},
		{"escaped key", "POST", "/v1/openai/v1/chat/completions", `{"mod\u0065l":"gpt-4o","messages":[]}`},
		{"model in query (realtime)", "GET", "/v1/openai/v1/realtime?model=gpt-4o-realtime-preview", ""},
		{"gemini body model vs path model", "POST", "/v1/gemini/v1beta/models/gemini-2.5-pro:generateContent", `{"model":"gemini-2.0-flash","contents":[]}`},
		{"multipart form model", "POST", "/v1/openai/v1/audio/transcriptions", "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(up.seen())
			var body any
			if tc.body != "" {
				body = tc.body
			}
			code, m, _ := k.do(tc.method, tc.path, tok, body)
			reached := len(up.seen()) > before
			t.Logf("status=%d reached_upstream=%v resp=%v", code, reached, m)
			if reached {
				t.Errorf("request for a non-enabled model reached the upstream: %s", up.last().Path+"?"+up.last().RawQuery)
			}
		})
	}
}

// 3. A lease-scoped token of a team that may not use a service can mark
// that service's keys invalid (persisted) without holding a lease.
func TestReviewReportForeignKey(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", nil)
	k.addService("other", up.URL, "bearer", nil)
	id := k.addKey("openai", "sk-review-victim-0123456789", nil)
	team := k.addTeam("limited", map[string]any{"allowed_services": []string{"other"}})
	tok := k.addToken(team, map[string]any{"scopes": []string{"lease"}})
	code, m, _ := k.do("GET", "/key?service=openai", tok, nil)
	t.Logf("lease openai: %d %v", code, m)
	code, m, _ = k.do("POST", "/key/"+id+"/report", tok, map[string]any{"outcome": "invalid"})
	t.Logf("report: %d %v", code, m)
	if code == 200 {
		t.Errorf("a token not allowed on service openai reported its key %s invalid: %v", id, m)
	}
}

// 4. budget_exceeded on a total limit comes without Retry-After.
func TestReviewTotalBudgetNoRetryAfter(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-review-total-0123456789", nil)
	team := k.addTeam("eng", map[string]any{"limit_tokens_total_block": 10})
	tok := k.addToken(team, nil)
	code, m, resp := k.do("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","messages":[],"max_tokens":100}`)
	t.Logf("status=%d retry-after=%q %v", code, resp.Header.Get("Retry-After"), m)
	if code == 429 && resp.Header.Get("Retry-After") == "" {
		t.Errorf("429 without Retry-After")
	}
}

// 5. A client that hangs up after the content but before the final usage
// chunk is charged nothing against its budget.
func TestReviewStreamCancelNotCharged(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		for i := range 3 {
			fmt.Fprintf(w, "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x%d\"},\"finish_reason\":null}]}\n\n", i)
		}
		fmt.Fprint(w, "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")
		f.Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		case <-time.After(2 * time.Second):
		}
		fmt.Fprint(w, "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":5000,\"completion_tokens\":5000,\"total_tokens\":10000}}\n\ndata: [DONE]\n\n")
	})
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-review-stream-0123456789", nil)
	team := k.addTeam("eng", map[string]any{"daily_token_limit": 12000})
	tok := k.addToken(team, nil)

	for i := range 3 {
		req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions", strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[],"max_tokens":10}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			t.Logf("request %d: %d %s", i, resp.StatusCode, b)
			resp.Body.Close()
			continue
		}
		br := bufio.NewReader(resp.Body)
		for {
			line, err := br.ReadString('\n')
			if err != nil || strings.Contains(line, `"finish_reason":"stop"`) {
				break
			}
		}
		resp.Body.Close() // hang up: everything generated was received
		time.Sleep(100 * time.Millisecond)
		t.Logf("request %d admitted and completed content", i)
	}
	close(release)
	time.Sleep(200 * time.Millisecond)
	// With 10000 tokens per request, the second request should have been
	// refused (daily_token_limit 12000).
	code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","messages":[],"max_tokens":10}`)
	t.Logf("after 3 streams: %d %v", code, m)
	if code != 429 {
		t.Errorf("streams cut before their usage chunk were never charged: still admitted (%d)", code)
	}
}
