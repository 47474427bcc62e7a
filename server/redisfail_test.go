package server_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/server"
)

// TestRedisDownFailPolicies: with Redis killed, budgets fail closed (503
// unavailable with Retry-After, never admitted uncounted), rpm limits
// fail open, no request pays the Redis timeout more than once per breaker
// window, the outage is logged once, and /readyz and the metrics say so.
func TestRedisDownFailPolicies(t *testing.T) {
	k, _, kill := redisKP(t, server.LimitsConfig{RedisTimeout: server.Duration(200 * time.Millisecond), RedisBreakerOpen: server.Duration(time.Hour)})
	budgeted := k.addToken(k.addTeam("eng", map[string]any{"limit_tokens_day_block": 100000}), nil)
	rated := k.addToken(k.addTeam("ops", map[string]any{"rpm_limit": 1000}), nil)
	body := `{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}`
	path := "/v1/openai/v1/chat/completions"
	for _, tok := range []string{budgeted, rated} {
		if resp, b := k.send("POST", path, tok, body); resp.StatusCode != 200 {
			t.Fatalf("with Redis up: %d %s", resp.StatusCode, b)
		}
	}
	kill()
	start := time.Now()
	for i := range 20 {
		resp, b := k.send("POST", path, budgeted, body)
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), `"unavailable"`) || resp.Header.Get("Retry-After") != "1" {
			t.Fatalf("budgeted request %d with Redis down: %d %s (want 503 unavailable, Retry-After 1)", i, resp.StatusCode, b)
		}
		if resp, b := k.send("POST", path, rated, body); resp.StatusCode != 200 {
			t.Fatalf("rate-limited request %d with Redis down: %d %s (want admitted: rpm fails open)", i, resp.StatusCode, b)
		}
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("40 requests with Redis down took %v: the timeout was paid more than once", el)
	}
	code, m, _ := k.do("GET", "/readyz", "", nil)
	if code != 200 || !strings.Contains(m["degraded"].(string), "redis unreachable: rate limits fail open, budgets fail closed") {
		t.Errorf("/readyz = %d %v", code, m)
	}
	_, metrics := k.send("GET", "/metrics", k.admin, "")
	if !strings.Contains(string(metrics), "keypool_limit_redis_down 1") {
		t.Errorf("metrics lack keypool_limit_redis_down 1")
	}
	if n := k.logCount("limit: redis unreachable", 1); n != 1 {
		t.Errorf("%d outage warnings, want 1:\n%s", n, k.logs.String())
	}
}

// TestRedisRestartedEmptyReseeds: Redis restarted empty forgets every
// counter; the budget is re-seeded from the usage records before anything
// is admitted against it, so a team with room for 2 more requests gets 2,
// not a fresh budget.
func TestRedisRestartedEmptyReseeds(t *testing.T) {
	k, url, kill := redisKP(t, server.LimitsConfig{RedisBreakerOpen: server.Duration(100 * time.Millisecond)})
	tok := k.addToken(k.addTeam("eng", map[string]any{"limit_tokens_day_block": 1000}), nil)
	body := `{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}`
	path := "/v1/openai/v1/chat/completions"
	for i := range 5 {
		if resp, b := k.send("POST", path, tok, body); resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, b)
		}
	}
	k.waitUsage(5) // 750 of 1000 tokens used
	kill()
	testutil.RestartRedis(t, url)
	admitted := 0
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, b := k.send("POST", path, tok, body)
		if resp.StatusCode == http.StatusServiceUnavailable && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond) // Redis back, not seeded yet: fail closed
			continue
		}
		if resp.StatusCode != 200 {
			if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), "budget_exceeded") {
				t.Fatalf("after restart: %d %s", resp.StatusCode, b)
			}
			break
		}
		admitted++
		k.waitUsage(int64(5 + admitted))
		if admitted > 10 {
			break
		}
	}
	if admitted != 2 {
		t.Errorf("admitted %d after Redis restarted empty with 750 of 1000 tokens used, want 2 (750, 900)", admitted)
	}
}

// redisKP starts keypoold on a private redis-server with limits lim and
// an openai service on an upstream that reports 150 tokens a request; it
// returns the server, the Redis URL and the function that kills Redis.
func redisKP(t *testing.T, lim server.LimitsConfig) (*kp, string, func()) {
	t.Helper()
	url, kill := testutil.StartRedis(t, 0)
	up := newUpstream(t, usage150)
	k := startKP(t, fastUsage, func(c *server.Config) {
		c.RedisURL = server.SecretURL(url)
		c.Limits = lim
	})
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-redis-limits-0123456789abcdef", nil)
	return k, url, kill
}
