package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
	"github.com/keypool/keypool/store/storetest"
)

// TestReplicas runs 3 keypoold processes on one PostgreSQL (a scratch
// database on KEYPOOL_TEST_POSTGRES) and one private redis-server, and
// measures: 1 000 parallel requests over the 3 against a team budget for
// 100 admit at most 100 + 1 per replica, the usage records sum to what
// was admitted and the Redis counter equals the records; a token revoked
// on one replica is refused by all within 1 s. About 30 s with the build.
func TestReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 3 keypoold processes")
	}
	dsn := storetest.PostgresDSN(t)
	redisURL, _ := testutil.StartRedis(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := os.Getenv("KEYPOOL_FAULTS_BIN")
	if bin == "" {
		var err error
		if bin, err = buildKeypoold(ctx, dir); err != nil {
			t.Fatal(err)
		}
	}
	const maxTokens = 50
	// The upstream reports the usage keypool estimates (body/4 rounded
	// up, plus max_tokens), so estimate = actual.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}`, (len(b)+3)/4, maxTokens)
	}))
	defer up.Close()
	body := fmt.Sprintf(`{"model":"gpt-4o-mini","max_tokens":%d,"messages":[{"role":"user","content":"hello"}]}`, maxTokens)
	perReq := (len(body)+3)/4 + maxTokens

	reps := make([]*keypoold, 3)
	for i := range reps {
		d := filepath.Join(dir, fmt.Sprint(i))
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		k, err := newKeypoold(bin, d, up.URL, serviceSpec{"openai", 1, "openai"}, "warn", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for j, e := range k.env {
			if strings.HasPrefix(e, "KEYPOOL_DATABASE=") {
				k.env[j] = "KEYPOOL_DATABASE=" + dsn
			}
		}
		k.env = append(k.env, "KEYPOOL_REDIS_URL="+redisURL)
		if err := k.start(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(k.close)
		reps[i] = k
	}
	admin := func(k *keypoold, method, path string, in any) map[string]any {
		t.Helper()
		b, _ := json.Marshal(in)
		req, _ := http.NewRequest(method, "http://"+k.addr+path, bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+faultAdminToken)
		req.Header.Set("Content-Type", "application/json")
		resp, err := probeClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&m)
		if resp.StatusCode >= 300 {
			t.Fatalf("%s %s: %d %v", method, path, resp.StatusCode, m)
		}
		return m
	}
	team := admin(reps[0], "POST", "/admin/teams", map[string]any{"name": "eng", "limit_tokens_total_block": 100 * perReq})["id"].(string)
	tok := admin(reps[0], "POST", "/admin/tokens", map[string]any{"name": "burst", "team_id": team})["token"].(string)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 400, MaxConnsPerHost: 400}}
	defer client.CloseIdleConnections()
	send := func(k *keypoold, tok string) (int, string) {
		req, _ := http.NewRequest("POST", "http://"+k.addr+"/v1/openai/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	burst := func(name, tok string, during func()) int64 {
		var admitted, budget, unavailable atomic.Int64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 1000 {
			wg.Go(func() {
				<-start
				code, b := send(reps[i%3], tok)
				switch {
				case code == 200:
					admitted.Add(1)
				case code == 429 && strings.Contains(b, "budget_exceeded"):
					budget.Add(1)
				case code == 503 && strings.Contains(b, `"unavailable"`):
					unavailable.Add(1)
				default:
					t.Errorf("status %d: %s", code, b)
				}
			})
		}
		began := time.Now()
		close(start)
		if during != nil {
			during()
		}
		wg.Wait()
		a := admitted.Load()
		t.Logf("%s: 1000 parallel over 3 replicas, budget for 100: admitted %d, refused %d budget_exceeded, %d unavailable, in %v",
			name, a, budget.Load(), unavailable.Load(), time.Since(began).Round(time.Millisecond))
		if a > 100+3 {
			t.Errorf("%s: admitted %d > 100 + 1 per replica", name, a)
		}
		return a
	}
	a := burst("burst", tok, nil)

	// Usage records = admitted; the Redis counter = the records.
	kr, err := seal.ParseKeyring("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	if err != nil {
		t.Fatal(err)
	}
	st, err := sqlstore.Open(ctx, dsn, sqlstore.Options{Keyring: kr})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var used int64
	deadline := time.Now().Add(20 * time.Second)
	for {
		rows, err := st.QueryUsage(ctx, store.UsageQuery{Team: team})
		if err != nil {
			t.Fatal(err)
		}
		used = 0
		if len(rows) == 1 {
			used = rows[0].TokensIn + rows[0].TokensOut
		}
		if used == a*int64(perReq) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if used != a*int64(perReq) {
		t.Errorf("usage records hold %d tokens, admitted %d × %d = %d", used, a, perReq, a*int64(perReq))
	}
	o, _ := redis.ParseURL(redisURL)
	rdb := redis.NewClient(o)
	defer rdb.Close()
	counter, err := rdb.Get(ctx, "keypool:limit:{tok:team:"+team+"}:t").Float64()
	if err != nil || int64(counter) != used {
		t.Errorf("redis counter %v (%v), usage records %d", counter, err, used)
	}
	t.Logf("records %d tokens = %d requests; redis counter %v", used, used/int64(perReq), counter)

	// Revocation on replica 0 reaches replicas 1 and 2 within 1 s.
	m := admin(reps[0], "POST", "/admin/tokens", map[string]any{"name": "revoked", "team_id": admin(reps[0], "POST", "/admin/teams", map[string]any{"name": "ops"})["id"]})
	tok2, id2 := m["token"].(string), m["id"].(string)
	for _, k := range reps[1:] {
		if code, b := send(k, tok2); code != 200 {
			t.Fatalf("token before revocation: %d %s", code, b)
		}
	}
	revoked := time.Now()
	admin(reps[0], "PATCH", "/admin/tokens/"+id2, map[string]any{"is_active": false})
	var worst time.Duration
	for _, k := range reps[1:] {
		for {
			code, _ := send(k, tok2)
			if code == http.StatusUnauthorized {
				break
			}
			if time.Since(revoked) > time.Second {
				t.Fatalf("replica %s still serves a revoked token after %v (status %d)", k.addr, time.Since(revoked), code)
			}
			time.Sleep(5 * time.Millisecond)
		}
		worst = max(worst, time.Since(revoked))
	}
	t.Logf("token revoked on replica 1: refused by replicas 2 and 3 within %v", worst.Round(time.Millisecond))

	// The same burst while Redis stalls for 600 ms: refusing or waiting,
	// never selling past the budget.
	team3 := admin(reps[0], "POST", "/admin/teams", map[string]any{"name": "stall", "limit_tokens_total_block": 100 * perReq})["id"].(string)
	tok3 := admin(reps[0], "POST", "/admin/tokens", map[string]any{"name": "stall", "team_id": team3})["token"].(string)
	burst("burst while redis stalls 600 ms", tok3, func() {
		if err := rdb.Do(ctx, "DEBUG", "SLEEP", "0.6").Err(); err != nil {
			t.Errorf("DEBUG SLEEP: %v", err)
		}
	})

	// kill -9 of one replica under load: the others keep serving, its
	// journal replays on restart, no record of an answered request lost.
	team4 := admin(reps[0], "POST", "/admin/teams", map[string]any{"name": "crash"})["id"].(string)
	tok4 := admin(reps[0], "POST", "/admin/tokens", map[string]any{"name": "crash", "team_id": team4})["token"].(string)
	var ok, othersFailed atomic.Int64
	var lwg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 30 {
		lwg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				r := (w + n) % 3
				code, _ := send(reps[r], tok4)
				switch {
				case code == 200:
					ok.Add(1)
				case r != 2:
					othersFailed.Add(1)
				}
			}
		})
	}
	time.Sleep(time.Second)
	reps[2].kill()
	time.Sleep(time.Second)
	if err := reps[2].start(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	lwg.Wait()
	var recs int64
	deadline = time.Now().Add(20 * time.Second)
	for {
		rows, err := st.QueryUsage(ctx, store.UsageQuery{Team: team4})
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) == 1 {
			recs = rows[0].Requests
		}
		if recs >= ok.Load() || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("kill -9 of replica 3 under load: %d answered 200, %d usage records, %d failures on the other replicas", ok.Load(), recs, othersFailed.Load())
	if recs < ok.Load() {
		t.Errorf("%d requests answered 200 but only %d usage records: records lost", ok.Load(), recs)
	}
	if othersFailed.Load() > 0 {
		t.Errorf("%d requests failed on the replicas that were not killed", othersFailed.Load())
	}
}
