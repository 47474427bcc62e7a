package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

// fixture reads a recorded response shape from meter/testdata.
func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "meter", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fixtureUpstream serves /f/{fixture}/... with that recorded response,
// as SSE for .sse files and JSON otherwise.
func fixtureUpstream(t *testing.T) *upstream {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/f/")
		name, _, _ := strings.Cut(rest, "/")
		b, err := os.ReadFile(filepath.Join("..", "meter", "testdata", name))
		if err != nil {
			http.Error(w, "no fixture", http.StatusNotFound)
			return
		}
		if strings.HasSuffix(name, ".sse") {
			w.Header().Set("Content-Type", "text/event-stream")
		} else {
			w.Header().Set("Content-Type", "application/json")
		}
		_, _ = w.Write(b)
	})
}

// fastUsage makes usage records reach the store within milliseconds.
func fastUsage(c *server.Config) { c.Usage.Interval = 5 * time.Millisecond }

// withClock makes keypoold read the time from clk.
func withClock(clk *fakeClock) kpOption { return func(c *server.Config) { c.Now = clk.Now } }

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// waitUsage waits until the store holds n usage records in all.
func (k *kp) waitUsage(n int64) {
	k.t.Helper()
	eventually(k.t, fmt.Sprintf("%d usage records", n), func() bool {
		rows, err := k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{})
		return err == nil && len(rows) == 1 && rows[0].Requests >= n
	})
}

// send posts a raw body and returns the response with its body read.
func (k *kp) send(method, path, token, body string) (*http.Response, []byte) {
	k.t.Helper()
	req, err := http.NewRequest(method, k.url+path, strings.NewReader(body))
	if err != nil {
		k.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func TestMeteringPerFamily(t *testing.T) {
	up := fixtureUpstream(t)
	k := startKP(t, fastUsage)
	cases := []struct {
		fixture, family, path, body string
		model                       string // as the response names it
		in, out, cached             int64
		usd                         float64
	}{
		{"openai_chat.json", "openai", "/v1/chat/completions", `{"model":"gpt-4o","messages":[]}`,
			"gpt-4o-2024-08-06", 125000, 3200, 100000, 0.2195},
		{"openai_chat_stream.sse", "", "/v1/chat/completions", `{"model":"gpt-4o-mini","messages":[],"stream":true,"stream_options":{"include_usage":true}}`,
			"gpt-4o-mini-2024-07-18", 40000, 1500, 0, 0.0069},
		{"openai_responses.json", "openai", "/v1/responses", `{"model":"gpt-4.1","input":"hi"}`,
			"gpt-4.1-2025-04-14", 300000, 20000, 200000, 0.46},
		{"openai_responses_stream.sse", "", "/v1/responses", `{"model":"o4-mini","input":"hi","stream":true}`,
			"o4-mini-2025-04-16", 10000, 50000, 4096, 0.2276208},
		{"anthropic_message.json", "anthropic", "/v1/messages", `{"model":"claude-sonnet-4-0","max_tokens":4096,"messages":[]}`,
			"claude-sonnet-4-20250514", 125000, 4000, 100000, 0.18},
		{"anthropic_stream.sse", "", "/v1/messages", `{"model":"claude-haiku-4-5","max_tokens":8192,"messages":[],"stream":true}`,
			"claude-haiku-4-5-20251001", 75000, 8000, 50000, 0.07},
		{"gemini.json", "gemini", "/v1beta/models/gemini-2.5-pro:generateContent", `{"contents":[]}`,
			"gemini-2.5-pro", 150000, 10000, 100000, 0.175},
		{"gemini_stream.sse", "", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", `{"contents":[]}`,
			"gemini-2.0-flash", 80000, 20000, 0, 0.016},
		{"gemini_stream_array.json", "gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", `{"contents":[]}`,
			"gemini-2.5-flash", 200000, 40000, 0, 0.16},
		{"groq_stream.sse", "openai", "/openai/v1/chat/completions", `{"model":"llama-3.3-70b-versatile","messages":[],"stream":true}`,
			"llama-3.3-70b-versatile", 100000, 20000, 0, 0.0748},
	}
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)
	for i, tc := range cases {
		t.Run(tc.fixture, func(t *testing.T) {
			name := fmt.Sprintf("svc%d", i)
			k.addService(name, up.URL+"/f/"+tc.fixture, "bearer", map[string]any{"llm_family": tc.family})
			k.addKey(name, fmt.Sprintf("sk-fixture-%02d-0123456789abcdef", i), nil)
			resp, got := k.send("POST", "/v1/"+name+tc.path, tok, tc.body)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, got)
			}
			if ae := up.last().Header.Get("Accept-Encoding"); ae != "identity" {
				t.Errorf("upstream Accept-Encoding = %q, want identity", ae)
			}
			if want := fixture(t, tc.fixture); !bytes.Equal(got, want) {
				t.Errorf("client body differs from the upstream's (%d vs %d bytes)", len(got), len(want))
			}
			var rows []store.UsageRow
			eventually(t, "usage", func() bool {
				rows, _ = k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{Service: name, GroupBy: []string{"model"}})
				return len(rows) == 1
			})
			r := rows[0]
			if r.Group["model"] != tc.model || r.TokensIn != tc.in || r.TokensOut != tc.out {
				t.Errorf("usage %+v, want model %s in %d out %d", r, tc.model, tc.in, tc.out)
			}
			if math.Round(r.Cost*100) != math.Round(tc.usd*100) || math.Abs(r.Cost-tc.usd) > 1e-9 {
				t.Errorf("cost %.7f, want %.7f", r.Cost, tc.usd)
			}
		})
	}

	// The admin usage API groups the same records by model, JSON and CSV.
	_, m, _ := k.do("GET", "/admin/usage?group_by=model", k.admin, nil)
	rows, _ := m["rows"].([]any)
	if rows == nil {
		rows, _ = m["data"].([]any)
	}
	byModel := map[string]map[string]any{}
	for _, r := range rows {
		row := r.(map[string]any)
		byModel[fmt.Sprint(row["model"])] = row
	}
	if r := byModel["claude-sonnet-4-20250514"]; r == nil || r["tokens_in"] != 125000.0 || r["tokens_out"] != 4000.0 || math.Abs(r["cost"].(float64)-0.18) > 1e-9 {
		t.Errorf("admin usage by model: %v", m)
	}
	req, _ := http.NewRequest("GET", k.url+"/admin/usage?group_by=model&format=csv", nil)
	req.Header.Set("Authorization", "Bearer "+k.admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	csv, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(csv), "gemini-2.5-flash,1,200000,40000,0.16") {
		t.Errorf("usage CSV:\n%s", csv)
	}
}

func TestStreamUsageChunk(t *testing.T) {
	up := fixtureUpstream(t)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL+"/f/openai_chat_stream.sse", "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-stream-0123456789abcdef", nil)
	tok := k.addToken(k.addTeam("eng", nil), nil)

	t.Run("client did not ask", func(t *testing.T) {
		body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}`
		resp, got := k.send("POST", "/v1/openai/v1/chat/completions", tok, body)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		sent := up.last().Body
		if want := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`; sent != want {
			t.Errorf("upstream got %s", sent)
		}
		if want := fixture(t, "openai_chat_stream.stripped.sse"); !bytes.Equal(got, want) {
			t.Errorf("client got %d bytes, want the stripped stream (%d bytes)", len(got), len(want))
		}
		k.waitUsage(1)
	})
	t.Run("client asked", func(t *testing.T) {
		body := `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}`
		resp, got := k.send("POST", "/v1/openai/v1/chat/completions", tok, body)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if sent := up.last().Body; sent != body {
			t.Errorf("upstream got %s, want the client's body unchanged", sent)
		}
		if want := fixture(t, "openai_chat_stream.sse"); !bytes.Equal(got, want) {
			t.Errorf("client got %d bytes, want the whole stream (%d bytes)", len(got), len(want))
		}
		k.waitUsage(2)
	})
	rows, _ := k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{})
	if rows[0].TokensIn != 80000 || rows[0].TokensOut != 3000 {
		t.Errorf("both streams metered: %+v", rows[0])
	}
}

// budgetAt is a UTC day's last minute, close to the real date so that
// usage retention never prunes the test's records.
func budgetAt() time.Time {
	d := time.Now().UTC().Truncate(24 * time.Hour)
	return d.Add(24*time.Hour - time.Minute)
}

func TestDailyTokenLimitTurnsWithTheDay(t *testing.T) {
	up := newUpstream(t, okJSON) // 11 + 7 = 18 tokens per request
	clk := &fakeClock{}
	clk.Set(budgetAt())
	k := startKP(t, fastUsage, withClock(clk))
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-daily-0123456789abcdef", nil)
	team := k.addTeam("eng", map[string]any{"daily_token_limit": 100})
	tok := k.addToken(team, nil)
	body := `{"model":"gpt-4o-mini","max_tokens":7}`
	admitted := 0
	var last *http.Response
	var lastBody []byte
	for i := range 20 {
		last, lastBody = k.send("POST", "/v1/openai/v1/chat/completions", tok, body)
		if last.StatusCode != 200 {
			break
		}
		admitted++
		k.waitUsage(int64(i + 1))
	}
	// Each request reserves 17 (38 body bytes / 4 = 10 input tokens, plus
	// max_tokens 7) and settles 18: a request is admitted while the day's
	// usage is below 100, so after 5 (90) a sixth goes through, after 6
	// (108) none.
	if last.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(lastBody), `"budget_exceeded"`) {
		t.Fatalf("after %d requests: %d %s", admitted, last.StatusCode, lastBody)
	}
	if admitted != 6 {
		t.Errorf("admitted %d requests under a daily limit of 100 tokens at 18 each, want 6", admitted)
	}
	if ra := last.Header.Get("Retry-After"); ra != "60" {
		t.Errorf("Retry-After = %q, want 60 (the UTC day ends in a minute)", ra)
	}
	if !strings.Contains(string(lastBody), "team daily tokens limit") {
		t.Errorf("message: %s", lastBody)
	}

	// A restart keeps the day's usage: still refused.
	if err := k.stop(); err != nil {
		t.Fatal(err)
	}
	k2 := startKP(t, fastUsage, withClock(clk), func(c *server.Config) { c.Database = server.SecretURL("sqlite:" + filepath.Join(k.dir, "keypool.db")) })
	if resp, b := k2.send("POST", "/v1/openai/v1/chat/completions", tok, body); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("after restart: %d %s, want 429 (usage seeded from the store)", resp.StatusCode, b)
	}

	// The UTC day turns: admitted again.
	clk.Set(budgetAt().Add(2 * time.Minute))
	if resp, b := k2.send("POST", "/v1/openai/v1/chat/completions", tok, body); resp.StatusCode != 200 {
		t.Fatalf("next day: %d %s", resp.StatusCode, b)
	}
}

func TestBudgetConcurrentStreams(t *testing.T) {
	const clients, fits = 200, 50
	release := make(chan struct{})
	var upstreamHits atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		upstreamHits.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, `data: {"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"}}]}`+"\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, `data: {"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":90,"total_tokens":100}}`+"\n\ndata: [DONE]\n\n")
	})
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-concurrent-0123456789abcdef", nil)
	body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":100}`
	est := int64(len(body)+3)/4 + 100 // the documented estimate: body bytes / 4 + max_tokens
	team := k.addTeam("eng", map[string]any{"daily_token_limit": fits * est})
	tok := k.addToken(team, nil)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	defer client.CloseIdleConnections()
	var admitted, refused atomic.Int64
	var headers, done sync.WaitGroup
	for range clients {
		headers.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+tok)
			resp, err := client.Do(req)
			headers.Done()
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			switch resp.StatusCode {
			case 200:
				admitted.Add(1)
				_, _ = io.Copy(io.Discard, resp.Body)
			case 429:
				refused.Add(1)
			default:
				t.Errorf("status %d", resp.StatusCode)
			}
		}()
	}
	headers.Wait() // every client has its answer; no admitted stream has finished
	close(release)
	done.Wait()
	// Actual usage (100) never exceeds the estimate, so the bound adds
	// nothing: at most 50 admitted.
	if a := admitted.Load(); a > fits || a < 1 || a+refused.Load() != clients {
		t.Fatalf("admitted %d, refused %d of %d; budget fits %d", a, refused.Load(), clients, fits)
	}
	if h := upstreamHits.Load(); h != admitted.Load() {
		t.Errorf("upstream saw %d requests, %d admitted", h, admitted.Load())
	}
	t.Logf("admitted %d of %d", admitted.Load(), clients)
}

func TestBudgetWarnNeverBlocks(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-warn-0123456789abcdef", nil)
	team := k.addTeam("eng", map[string]any{"limit_cost_day_warn": 0.000001, "limit_tokens_hour_warn": 1})
	tok := k.addToken(team, nil)
	for i := range 5 {
		resp, b := k.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","max_tokens":7}`)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, b)
		}
		w := resp.Header.Get(server.HeaderBudgetWarning)
		if !strings.Contains(w, "team hour tokens") || !strings.Contains(w, "team day cost") || !strings.HasSuffix(w, "%") {
			t.Errorf("request %d: %s = %q", i, server.HeaderBudgetWarning, w)
		}
	}
	_, m, _ := k.do("GET", "/metrics", "", nil)
	if raw, _ := m["_raw"].(string); !strings.Contains(raw, `keypool_budget_warnings_total{scope="team",unit="cost",window="day"} 5`) {
		t.Errorf("warning metric missing:\n%s", grepLines(raw, "budget"))
	}
	eventually(t, "warning logged", func() bool { return strings.Contains(k.logs.String(), "budget warning") })
}

func grepLines(s, sub string) string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if strings.Contains(sc.Text(), sub) {
			out = append(out, sc.Text())
		}
	}
	return strings.Join(out, "\n")
}

func TestModelsEnabled(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/models") {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"object":"list","data":[{"id":"upstream-model","object":"model","owned_by":"x"}]}`)
			return
		}
		okJSON(w, r)
	})
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai", "models_enabled": []string{"gpt-4o-mini", "gpt-4o", "o3"}})
	k.addService("open", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-models-0123456789abcdef", nil)
	k.addKey("open", "sk-models-1123456789abcdef", nil)
	team := k.addTeam("eng", map[string]any{"models_enabled": []string{"gpt-4o-mini", "gpt-4o"}})
	tok := k.addToken(team, map[string]any{"models_enabled": []string{"gpt-4o-mini", "o3"}})

	for _, tc := range []struct {
		model string
		want  int
	}{{"gpt-4o-mini", 200}, {"gpt-4o", 403}, {"o3", 403}, {"gpt-5", 403}} {
		resp, b := k.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"`+tc.model+`"}`)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d %s, want %d", tc.model, resp.StatusCode, b, tc.want)
		}
		if tc.want == 403 && (!strings.Contains(string(b), `"forbidden"`) || !strings.Contains(string(b), tc.model)) {
			t.Errorf("%s: %s", tc.model, b)
		}
	}
	// The team's list applies on a service without one.
	if resp, b := k.send("POST", "/v1/open/v1/chat/completions", tok, `{"model":"gpt-4o"}`); resp.StatusCode != 403 {
		t.Errorf("team list on open service: %d %s", resp.StatusCode, b)
	}

	for _, p := range []string{"/v1/openai/models", "/v1/openai/v1/models"} {
		code, m, _ := k.do("GET", p, tok, nil)
		b, _ := json.Marshal(m)
		if code != 200 || string(b) != `{"data":[{"created":0,"id":"gpt-4o-mini","object":"model","owned_by":"openai"}],"object":"list"}` {
			t.Errorf("GET %s = %d %s", p, code, b)
		}
	}
	if code, _, _ := k.do("GET", "/v1/openai/models", "kp_wrong", nil); code != 401 {
		t.Errorf("models listing without a valid token: %d", code)
	}
	n := len(up.seen())
	if code, m, _ := k.do("GET", "/v1/open/v1/models", tok, nil); code != 200 || !strings.Contains(fmt.Sprint(m), "upstream-model") || len(up.seen()) != n+1 {
		t.Errorf("listing of a service without allow-list should pass through: %d %v", code, m)
	}
}

func TestKeySpendExhaustsKey(t *testing.T) {
	up := fixtureUpstream(t)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL+"/f/openai_chat.json", "bearer", map[string]any{"llm_family": "openai"})
	// Each request costs $0.2195 (gpt-4o, see TestMeteringPerFamily).
	a := k.addKey("openai", "sk-spend-A-0123456789abcdef", map[string]any{"balance_total": 0.25, "balance_unit": "usd"})
	b := k.addKey("openai", "sk-spend-B-0123456789abcdef", map[string]any{"balance_total": 100, "balance_unit": "requests"})
	tok := k.addToken(k.addTeam("eng", nil), nil)
	served := map[string]int{}
	for i := range 6 {
		resp, body := k.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o"}`)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		served[resp.Header.Get("X-Keypool-Key-Id")]++
		k.waitUsage(int64(i + 1))
	}
	if served[a] != 2 || served[b] != 4 {
		t.Errorf("served %v: want key A twice (its $0.25 is spent by the second request), then only B", served)
	}
	_, m, _ := k.do("GET", "/admin/keys/"+a, k.admin, nil)
	if m["state"] != "exhausted" {
		t.Errorf("key A: %v", m)
	}
	eventually(t, "spend stored", func() bool {
		ka, _ := k.srv.Store().GetKey(context.Background(), a)
		kb, _ := k.srv.Store().GetKey(context.Background(), b)
		return math.Abs(ka.BalanceUsed-0.439) < 1e-9 && kb.BalanceUsed == 4
	})
}
