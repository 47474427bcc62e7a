package server_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/server"
)

// TestRedisOutageLogsChargeFailuresOncePerOutage: 200 requests finishing
// while Redis is down fail to charge the budget counters; that is one
// warning when it starts and one line with the count when Redis is back,
// not a line per request, and a metric counts them.
func TestRedisOutageLogsChargeFailuresOncePerOutage(t *testing.T) {
	k, url, kill := redisKP(t, server.LimitsConfig{RedisBreakerOpen: server.Duration(100 * time.Millisecond)})
	tok := k.addToken(k.addTeam("eng", nil), nil) // no budget: each request charges its counters
	body := `{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}`
	path := "/v1/openai/v1/chat/completions"
	if resp, b := k.send("POST", path, tok, body); resp.StatusCode != 200 {
		t.Fatalf("with Redis up: %d %s", resp.StatusCode, b)
	}
	kill()
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			if resp, b := k.send("POST", path, tok, body); resp.StatusCode != 200 {
				t.Errorf("request %d with Redis down: %d %s", i, resp.StatusCode, b)
			}
		})
		if i%20 == 19 {
			wg.Wait()
		}
	}
	wg.Wait()
	testutil.RestartRedis(t, url)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(k.logs.String(), "budget charges succeed again") && time.Now().Before(deadline) {
		k.send("POST", path, tok, body)
		time.Sleep(50 * time.Millisecond)
	}
	logs := k.logs.String()
	start, end := strings.Count(logs, "budget charges failing"), strings.Count(logs, "budget charges succeed again")
	if start != 1 || end != 1 || strings.Contains(logs, "budget charge failed") {
		t.Errorf("%d start and %d end lines for an outage of 200 requests, want 1 and 1:\n%s", start, end, logs)
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "budget charges succeed again") && !strings.Contains(l, `"failed":`) && !strings.Contains(l, "failed=") {
			t.Errorf("the end line does not carry the count: %s", l)
		}
	}
	_, metrics := k.send("GET", "/metrics", k.admin, "")
	var n float64
	for _, l := range strings.Split(string(metrics), "\n") {
		if v, ok := strings.CutPrefix(l, "keypool_budget_charge_failures_total "); ok {
			fmt.Sscan(v, &n)
		}
	}
	if n < 200 {
		t.Errorf("keypool_budget_charge_failures_total = %v, want ≥ 200", n)
	}
}

func TestLimitsRedisFailPolicies(t *testing.T) {
	for _, tc := range []struct {
		fail, rate string
		ok         bool
	}{
		{"", "", true},
		{"closed", "open", true},
		{"open", "closed", true},
		{"LOCAL", "", true},
		{"", "local", false}, // a local share is for budgets only
		{"shared", "", false},
	} {
		c := server.Config{Limits: server.LimitsConfig{RedisFail: tc.fail, RedisFailRate: tc.rate}}
		if err := c.Validate(); (err == nil) != tc.ok {
			t.Errorf("redis_fail %q, redis_fail_rate %q: %v, want ok %v", tc.fail, tc.rate, err, tc.ok)
		}
	}
}

// TestRedisFailLocalAdmitsAShareDuringAnOutage: with redis_fail: local,
// a team with 6 requests of room left when Redis goes down gets at most
// its share of them on this (single) replica, then 503 — not every
// request (open), not none (closed). /readyz says which policy applies.
func TestRedisFailLocalAdmitsAShareDuringAnOutage(t *testing.T) {
	k, _, kill := redisKP(t, server.LimitsConfig{RedisFail: "local", RedisBreakerOpen: server.Duration(time.Hour)})
	tok := k.addToken(k.addTeam("eng", map[string]any{"limit_tokens_day_block": 1500}), nil)
	body := `{"model":"gpt-4o-mini","max_tokens":150,"messages":[{"role":"user","content":"hi"}]}`
	path := "/v1/openai/v1/chat/completions"
	for i := range 4 {
		if resp, b := k.send("POST", path, tok, body); resp.StatusCode != 200 {
			t.Fatalf("request %d with Redis up: %d %s", i, resp.StatusCode, b)
		}
	}
	kill() // 600 of 1 500 tokens used: room for 6 more requests of 150 (estimate ≥ actual)
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() {
			resp, _ := k.send("POST", path, tok, body)
			mu.Lock()
			codes[resp.StatusCode]++
			mu.Unlock()
		})
	}
	wg.Wait()
	// One replica: its share is the whole room, and the last admission may
	// cross it by one request (estimate 150 > room left).
	if codes[200] < 5 || codes[200] > 7 || codes[200]+codes[503] != 100 {
		t.Errorf("100 concurrent requests with Redis down and room for 6: %v, want 5–7 × 200, the rest 503", codes)
	}
	code, m, _ := k.do("GET", "/readyz", "", nil)
	if code != 200 || !strings.Contains(fmt.Sprint(m["degraded"]), "budgets on a local share") {
		t.Errorf("/readyz = %d %v", code, m)
	}
}
