package server_test

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store/storetest"
)

// TestRedisSharedRateLimit runs two replicas on one database and one
// Redis: a team's rpm_limit holds across both.
func TestRedisSharedRateLimit(t *testing.T) {
	redisURL := os.Getenv("KEYPOOL_TEST_REDIS")
	if redisURL == "" {
		t.Skip("KEYPOOL_TEST_REDIS is not set; skipping Redis test")
	}
	up := newUpstream(t, okJSON)
	var db server.SecretURL
	k1 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); db = c.Database })
	k2 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); c.Database = db })
	tok, _ := setup(t, k1, up, map[string]any{"rpm_limit": 3}, keyA)
	k2.srv.Syncer().Trigger()
	eventually(t, "replica 2 loads the service", func() bool { _, ok := k2.srv.Pool().Service("openai"); return ok })

	for i, k := range []*kp{k1, k2, k1} {
		if code, m, _ := k.do("GET", "/v1/openai/v1/models", tok, nil); code != 200 {
			t.Fatalf("request %d: %d %v", i, code, m)
		}
	}
	code, m, resp := k2.do("GET", "/v1/openai/v1/models", tok, nil)
	if code != 429 || m["error"].(map[string]any)["code"] != "rate_limited" || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("4th request across replicas: %d %v, want 429 rate_limited", code, m)
	}
}

// TestPostgres runs keypoold on PostgreSQL: two replicas share the
// database, and a change made through one reaches the other by NOTIFY,
// long before its polling interval.
func TestPostgres(t *testing.T) {
	dsn := storetest.PostgresDSN(t)
	up := newUpstream(t, okJSON)
	slow := func(c *server.Config) {
		c.Database = server.SecretURL(dsn)
		c.SyncInterval = server.Duration(time.Hour)
	}
	k1 := startKP(t, slow)
	k2 := startKP(t, slow)
	tok, ids := setup(t, k1, up, nil, keyA)
	eventually(t, "replica 2 sees the new key through NOTIFY", func() bool {
		st, ok := k2.srv.Pool().Stats("openai")
		return ok && len(st) == 1 && st[0].ID == ids[0]
	})
	code, m, resp := k2.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"})
	if code != 200 || resp.Header.Get("X-Keypool-Key-Id") != ids[0] {
		t.Fatalf("proxy on replica 2: %d %v", code, m)
	}
	if bearerKey(up.last().Header) != keyA {
		t.Error("upstream did not get the pooled key")
	}
	if code, m, _ := k2.do("GET", "/readyz", "", nil); code != 200 {
		t.Errorf("readyz: %d %v", code, m)
	}
	k2.checkLogs()
	k1.checkLogs()
}

// TestRedisSharedKeyState runs two replicas on one database and one Redis:
// a key that replica 1 sees rate-limited is routed around by replica 2
// too, without replica 2 spending a request to find out.
func TestRedisSharedKeyState(t *testing.T) {
	redisURL, up := redisAndLimitedUpstream(t)
	var db server.SecretURL
	k1 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); db = c.Database })
	k2 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); c.Database = db })
	tok, ids := setup(t, k1, up, nil, keyA, keyB)
	k2.srv.Syncer().Trigger()
	eventually(t, "replica 2 loads both keys", func() bool { st, _ := k2.srv.Pool().Stats("openai"); return len(st) == 2 })

	// Replica 1 meets the 429 on key A (and fails over to key B).
	meetRateLimit(t, k1, tok)
	stateOn := func(k *kp, id string) keypool.State {
		st, _ := k.srv.Pool().Stats("openai")
		for _, s := range st {
			if s.ID == id {
				return s.State
			}
		}
		return keypool.StateDisabled
	}
	if stateOn(k1, ids[0]) != keypool.StateCooling {
		t.Fatalf("replica 1: key A is %v", stateOn(k1, ids[0]))
	}
	eventually(t, "replica 2 learns key A is cooling", func() bool { return stateOn(k2, ids[0]) == keypool.StateCooling })
	before := len(up.seen())
	for range 4 {
		if code, m, resp := k2.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"}); code != 200 || resp.Header.Get("X-Keypool-Key-Id") != ids[1] {
			t.Fatalf("replica 2: %d %v", code, m)
		}
	}
	if n := len(up.seen()) - before; n != 4 {
		t.Fatalf("replica 2 sent %d upstream requests for 4 calls: it retried key A", n)
	}
	k1.checkLogs()
	k2.checkLogs()
}

// TestRedisSharedKeyStateLateReplica: a replica that starts after a key
// was rate-limited elsewhere still routes around it.
func TestRedisSharedKeyStateLateReplica(t *testing.T) {
	redisURL, up := redisAndLimitedUpstream(t)
	var db server.SecretURL
	k1 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); db = c.Database })
	tok, ids := setup(t, k1, up, nil, keyA, keyB)
	meetRateLimit(t, k1, tok)
	// Give the publisher a moment to write the state.
	opt, err := redis.ParseURL(redisURL)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	eventually(t, "the state reaches Redis", func() bool {
		v, _ := rdb.HGet(context.Background(), "keypool:key-state", "openai\x00"+ids[0]).Result()
		return strings.Contains(v, `"cooling"`)
	})
	k2 := startKP(t, func(c *server.Config) { c.RedisURL = server.SecretURL(redisURL); c.Database = db })
	st, _ := k2.srv.Pool().Stats("openai")
	for _, s := range st {
		if s.ID == ids[0] && s.State != keypool.StateCooling {
			t.Fatalf("late replica: key A is %v, want cooling", s.State)
		}
	}
}

// redisAndLimitedUpstream skips without Redis, and returns its URL and an
// upstream that rate-limits keyA (Retry-After 120) and serves keyB.
func redisAndLimitedUpstream(t *testing.T) (string, *upstream) {
	t.Helper()
	redisURL := os.Getenv("KEYPOOL_TEST_REDIS")
	if redisURL == "" {
		t.Skip("KEYPOOL_TEST_REDIS is not set; skipping Redis test")
	}
	return redisURL, newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bearerKey(r.Header) == keyA {
			w.Header().Set("Retry-After", "120")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		okJSON(w, r)
	})
}

// meetRateLimit sends two requests through k, so that (round robin over
// keyA and keyB) one meets keyA's 429 and fails over.
func meetRateLimit(t *testing.T, k *kp, tok string) {
	t.Helper()
	for range 2 {
		if code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini"}); code != 200 {
			t.Fatalf("replica 1: %d %v", code, m)
		}
	}
}
