package server_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

// usage150 answers a chat completion that used 150 tokens (100 in, 50 out).
func usage150(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150}}`)
}

// limiterBackends are the limiter backends keypoold runs the budget tests
// on: local always, Redis when KEYPOOL_TEST_REDIS is set.
func limiterBackends() map[string]kpOption {
	m := map[string]kpOption{"local": func(*server.Config) {}}
	if url := os.Getenv("KEYPOOL_TEST_REDIS"); url != "" {
		m["redis"] = func(c *server.Config) { c.RedisURL = server.SecretURL(url) }
	}
	return m
}

// TestSmallBudgetAdmitsWhatFits: a budget of 1000 tokens with requests
// that set no max_tokens (estimate: body/4 + 1024 output tokens, past the
// limit alone) admits requests of 150 real tokens until the limit is
// reached: six fit, the seventh is admitted at 900 used, the eighth is
// refused with what was used and reserved, and a Retry-After.
func TestSmallBudgetAdmitsWhatFits(t *testing.T) {
	for bname, backend := range limiterBackends() {
		for _, tc := range []struct {
			name  string
			scope string // team, token or service
			field string
		}{
			{"team daily_token_limit", "team", "daily_token_limit"},
			{"team limit_tokens_day_block", "team", "limit_tokens_day_block"},
			{"team tpm_limit", "team", "tpm_limit"},
			{"token limit_tokens_hour_block", "token", "limit_tokens_hour_block"},
			{"token limit_tokens_month_block", "token", "limit_tokens_month_block"},
			{"service limit_tokens_total_block", "service", "limit_tokens_total_block"},
		} {
			t.Run(bname+"/"+tc.name, func(t *testing.T) {
				up := newUpstream(t, usage150)
				k := startKP(t, fastUsage, backend)
				svc := fmt.Sprintf("openai%x", os.Getpid()) + strings.ReplaceAll(tc.field, "_", "")
				extra := map[string]any{"llm_family": "openai"}
				if tc.scope == "service" {
					extra[tc.field] = 1000
				}
				k.addService(svc, up.URL, "bearer", extra)
				k.addKey(svc, "sk-small-budget-0123456789abcdef", nil)
				teamExtra := map[string]any{}
				if tc.scope == "team" {
					teamExtra[tc.field] = 1000
				}
				team := k.addTeam("eng", teamExtra)
				tokExtra := map[string]any{}
				if tc.scope == "token" {
					tokExtra[tc.field] = 1000
				}
				tok := k.addToken(team, tokExtra)
				body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}`
				var last *http.Response
				var lastBody []byte
				admitted := 0
				for i := range 10 {
					last, lastBody = k.send("POST", "/v1/"+svc+"/v1/chat/completions", tok, body)
					if last.StatusCode != http.StatusOK {
						break
					}
					admitted++
					k.waitUsage(int64(i + 1))
				}
				if admitted < 6 {
					t.Fatalf("admitted %d: %d %s", admitted, last.StatusCode, lastBody)
				}
				if admitted != 7 {
					t.Errorf("admitted %d requests of 150 tokens under 1000, want 7 (six fit, the seventh at 900 used)", admitted)
				}
				msg := string(lastBody)
				if last.StatusCode != http.StatusTooManyRequests || !strings.Contains(msg, `"budget_exceeded"`) {
					t.Fatalf("after %d: %d %s", admitted, last.StatusCode, msg)
				}
				if !strings.Contains(msg, "1050 tokens used") || !strings.Contains(msg, "0 tokens reserved") {
					t.Errorf("message does not say what was used and reserved: %s", msg)
				}
				if last.Header.Get("Retry-After") == "" {
					t.Errorf("no Retry-After on %s", msg)
				}
			})
		}
	}
}

// TestBudgetBurstWithinBound: 500 concurrent requests against a team
// budget of 10 000 tokens, each estimated at body/4 + 1024 and using
// 150. The usage the admitted requests recorded stays within the
// documented bound: the limit plus the last admitted request's actual
// usage (actual never exceeds the estimate here, so the sum adds nothing).
func TestBudgetBurstWithinBound(t *testing.T) {
	for bname, backend := range limiterBackends() {
		t.Run(bname, func(t *testing.T) {
			const clients, block = 500, 10000
			up := newUpstream(t, usage150)
			k := startKP(t, fastUsage, backend)
			svc := fmt.Sprintf("burst%x", os.Getpid())
			k.addService(svc, up.URL, "bearer", map[string]any{"llm_family": "openai"})
			k.addKey(svc, "sk-burst-0123456789abcdef", nil)
			team := k.addTeam("eng", map[string]any{"daily_token_limit": block})
			tok := k.addToken(team, nil)
			body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}`
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64}}
			defer client.CloseIdleConnections()
			var admitted, refused atomic.Int64
			var wg sync.WaitGroup
			start := make(chan struct{})
			for range clients {
				wg.Go(func() {
					<-start
					req, _ := http.NewRequest("POST", k.url+"/v1/"+svc+"/v1/chat/completions", strings.NewReader(body))
					req.Header.Set("Authorization", "Bearer "+tok)
					resp, err := client.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					defer resp.Body.Close()
					b, _ := io.ReadAll(resp.Body)
					switch resp.StatusCode {
					case http.StatusOK:
						admitted.Add(1)
					case http.StatusTooManyRequests:
						refused.Add(1)
						if resp.Header.Get("Retry-After") == "" || !strings.Contains(string(b), "budget_exceeded") {
							t.Errorf("refusal: %s", b)
						}
					case http.StatusServiceUnavailable:
						// Redis slower than its timeout under load:
						// budgets fail closed (limits.redis_fail).
						refused.Add(1)
						if resp.Header.Get("Retry-After") == "" || !strings.Contains(string(b), `"unavailable"`) {
							t.Errorf("refusal: %s", b)
						}
					default:
						t.Errorf("status %d: %s", resp.StatusCode, b)
					}
				})
			}
			close(start)
			wg.Wait()
			a := admitted.Load()
			k.waitUsage(a)
			rows, err := k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{Team: team})
			if err != nil || len(rows) != 1 {
				t.Fatalf("usage: %v %v", rows, err)
			}
			used := rows[0].TokensIn + rows[0].TokensOut
			if used > block+150 {
				t.Fatalf("admitted %d, used %d tokens > bound %d", a, used, block+150)
			}
			if a+refused.Load() != clients || a < 1 {
				t.Fatalf("admitted %d refused %d of %d", a, refused.Load(), clients)
			}
			t.Logf("admitted %d of %d, %d tokens used of %d (bound %d)", a, clients, used, block, block+150)
		})
	}
}
