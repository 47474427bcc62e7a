package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

// replConfig sizes the replica suite (-mode replicas).
type replConfig struct {
	burst   int           // parallel requests of the budget bursts
	budget  int           // requests the burst's team budget allows
	rpmRun  time.Duration // how long the rpm scenario runs
	outage  time.Duration // how long Redis is down
	workers int           // concurrent clients of the load scenarios
	// outageRate is the requests per second the outage scenario's
	// open-loop load offers, the same before and during the outage.
	outageRate float64
	// noisy relaxes the outage's added-latency bound from 5 ms to half
	// the Redis timeout (250 ms): at CI size, under -race on shared cores
	// beside other tests, a 5 s window's p99 moves by tens of ms on its
	// own (up to 135 ms seen). What the bound must catch still fails it:
	// requests that pay the Redis timeout (500 ms) during the outage.
	// The full size keeps 5 ms.
	noisy bool
}

// defaultOutageRate is the outage scenario's offered load: well under
// what 3 replicas serve on 2 shared CPUs with Redis up, so that neither
// phase queues.
const defaultOutageRate = 200

// ciReplConfig is the suite's CI size (TestReplicas, -short): the full
// bursts, a 10 s rpm run and a 5 s Redis outage.
func ciReplConfig() replConfig {
	return replConfig{burst: 1000, budget: 100, rpmRun: 10 * time.Second, outage: 5 * time.Second, workers: 32, outageRate: defaultOutageRate, noisy: true}
}

// replCluster is 3 keypoold processes on one PostgreSQL database and one
// private redis-server, in front of an in-process stand-in upstream
// whose reported usage equals keypool's estimate.
type replCluster struct {
	reps   []*keypoold
	redis  *redisProc
	rdb    *redis.Client
	st     store.Store
	up     *httptest.Server
	client *http.Client
	body   string
	perReq int
}

const replMaxTokens = 50

// startCluster builds nothing: bin is the keypoold binary, dsn a scratch
// PostgreSQL database.
func startCluster(ctx context.Context, bin, dir, dsn string, n int) (*replCluster, error) {
	c := &replCluster{}
	rp, err := startRedisProc()
	if err != nil {
		return nil, err
	}
	c.redis = rp
	c.up = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}`, (len(b)+3)/4, replMaxTokens)
	}))
	c.body = fmt.Sprintf(`{"model":"gpt-4o-mini","max_tokens":%d,"messages":[{"role":"user","content":"hello"}]}`, replMaxTokens)
	c.perReq = (len(c.body)+3)/4 + replMaxTokens
	c.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 400, MaxConnsPerHost: 400}, Timeout: 30 * time.Second}
	for i := range n {
		d := filepath.Join(dir, fmt.Sprint(i))
		if err := os.MkdirAll(d, 0o700); err != nil {
			c.close()
			return nil, err
		}
		k, err := newKeypoold(bin, d, c.up.URL, serviceSpec{"openai", 1, "openai"}, "warn", 5*time.Second)
		if err != nil {
			c.close()
			return nil, err
		}
		for j, e := range k.env {
			if strings.HasPrefix(e, "KEYPOOL_DATABASE=") {
				k.env[j] = "KEYPOOL_DATABASE=" + dsn
			}
		}
		k.env = append(k.env, "KEYPOOL_REDIS_URL="+rp.url())
		c.reps = append(c.reps, k)
		if err := k.start(ctx); err != nil {
			c.close()
			return nil, err
		}
	}
	o, _ := redis.ParseURL(rp.url())
	c.rdb = redis.NewClient(o)
	kr, err := seal.ParseKeyring("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	if err != nil {
		c.close()
		return nil, err
	}
	if c.st, err = sqlstore.Open(ctx, dsn, sqlstore.Options{Keyring: kr}); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// close stops everything startCluster started.
func (c *replCluster) close() {
	for _, k := range c.reps {
		k.close()
	}
	if c.st != nil {
		_ = c.st.Close()
	}
	if c.rdb != nil {
		_ = c.rdb.Close()
	}
	if c.redis != nil {
		c.redis.kill()
	}
	if c.up != nil {
		c.up.Close()
	}
	c.client.CloseIdleConnections()
}

// adminCall calls replica k's admin API and decodes the answer.
func (c *replCluster) adminCall(k *keypoold, method, path string, in any) (map[string]any, error) {
	b, _ := json.Marshal(in)
	req, _ := http.NewRequest(method, "http://"+k.addr+path, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+faultAdminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := probeClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	if resp.StatusCode >= 300 {
		return nil, fmt.Errorf("%s %s: %d %v", method, path, resp.StatusCode, m)
	}
	return m, nil
}

// teamToken creates a team with the given limits and a token of it; it
// returns the team id, the token and its id.
func (c *replCluster) teamToken(name string, limits map[string]any) (team, tok, tokID string, err error) {
	in := map[string]any{"name": name}
	for k, v := range limits {
		in[k] = v
	}
	m, err := c.adminCall(c.reps[0], "POST", "/admin/teams", in)
	if err != nil {
		return "", "", "", err
	}
	team, _ = m["id"].(string)
	m, err = c.adminCall(c.reps[0], "POST", "/admin/tokens", map[string]any{"name": name, "team_id": team})
	if err != nil {
		return "", "", "", err
	}
	tok, _ = m["token"].(string)
	tokID, _ = m["id"].(string)
	return team, tok, tokID, nil
}

// reply is one proxied request's outcome.
type reply struct {
	code       int
	body       string
	retryAfter string
	latency    time.Duration
	done       time.Time
}

// send proxies one chat completion through replica k with tok.
func (c *replCluster) send(k *keypoold, tok string) reply {
	req, _ := http.NewRequest("POST", "http://"+k.addr+"/v1/openai/v1/chat/completions", strings.NewReader(c.body))
	req.Header.Set("Authorization", "Bearer "+tok)
	began := time.Now()
	resp, err := c.client.Do(req)
	if err != nil {
		return reply{body: err.Error(), latency: time.Since(began), done: time.Now()}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{code: resp.StatusCode, body: string(b), retryAfter: resp.Header.Get("Retry-After"), latency: time.Since(began), done: time.Now()}
}

// burstResult counts one burst's outcomes.
type burstResult struct {
	admitted, budget, unavailable, other int64
	took                                 time.Duration
}

// burst sends n requests at once over the replicas with tok; during runs
// right after they are released.
func (c *replCluster) burst(n int, tok string, during func()) burstResult {
	var admitted, budget, unavailable, other atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			r := c.send(c.reps[i%len(c.reps)], tok)
			switch {
			case r.code == 200:
				admitted.Add(1)
			case r.code == 429 && strings.Contains(r.body, "budget_exceeded"):
				budget.Add(1)
			case r.code == 503:
				unavailable.Add(1)
			default:
				other.Add(1)
			}
		})
	}
	began := time.Now()
	close(start)
	if during != nil {
		during()
	}
	wg.Wait()
	return burstResult{admitted.Load(), budget.Load(), unavailable.Load(), other.Load(), time.Since(began)}
}

// usage waits up to 20 s for the team's usage records to reach want
// requests and returns the records' requests and tokens.
func (c *replCluster) usage(ctx context.Context, team string, want int64) (reqs, tokens int64, err error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		rows, err := c.st.QueryUsage(ctx, store.UsageQuery{Team: team})
		if err != nil {
			return 0, 0, err
		}
		reqs, tokens = 0, 0
		for _, r := range rows {
			reqs += r.Requests
			tokens += r.TokensIn + r.TokensOut
		}
		if reqs >= want || time.Now().After(deadline) {
			return reqs, tokens, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// replCheck is one figure against its bound.
type replCheck struct {
	name, figure string
	ok           bool
}

// replReport collects the suite's checks.
type replReport struct {
	checks []replCheck
	out    io.Writer
}

func (r *replReport) add(ok bool, name, format string, args ...any) {
	c := replCheck{name, fmt.Sprintf(format, args...), ok}
	r.checks = append(r.checks, c)
	res := "PASS"
	if !ok {
		res = "FAIL"
	}
	fmt.Fprintf(r.out, "  %-4s %-34s %s\n", res, name, c.figure)
}

func (r *replReport) failed() bool {
	for _, c := range r.checks {
		if !c.ok {
			return true
		}
	}
	return false
}

// replicasMain is -mode replicas: 3 keypoold processes on a scratch
// PostgreSQL database and a private redis-server, and the six measures
// of issue 9 with PASS/FAIL against their bounds. It returns the exit
// code (1 when a bound failed).
func replicasMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("replicas", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		pg      = fs.String("postgres", os.Getenv("KEYPOOL_TEST_POSTGRES"), "PostgreSQL DSN; the suite creates and drops a scratch database next to it (default $KEYPOOL_TEST_POSTGRES)")
		bin     = fs.String("keypoold", "", "keypoold binary to test (default: go build ./cmd/keypoold)")
		short   = fs.Bool("short", false, "CI size: rpm for 10 s, Redis down 5 s (bounds scaled)")
		burstN  = fs.Int("burst", 1000, "parallel requests of the budget bursts")
		budget  = fs.Int("budget", 100, "requests the bursts' team budget allows")
		rpmRun  = fs.Duration("rpm-run", 70*time.Second, "how long the rpm scenario runs")
		outage  = fs.Duration("outage", 60*time.Second, "how long Redis is down in the restart scenario")
		workers = fs.Int("workers", 32, "concurrent clients of the load scenarios")
		oRate   = fs.Float64("outage-rate", defaultOutageRate, "requests per second the outage scenario's open-loop load offers, before and during the outage alike")
		list    = fs.String("scenarios", "all", "comma-separated scenarios: burst,stall,rpm,outage,revoke,crash")
		keep    = fs.Bool("keep", false, "keep the scratch directory (keypoold logs)")
		timeout = fs.Duration("timeout", 15*time.Minute, "bound on the whole run")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *oRate <= 0 {
		fmt.Fprintln(stderr, "bench: -outage-rate must be positive")
		return 2
	}
	if *pg == "" {
		fmt.Fprintln(stderr, "bench: -mode replicas needs -postgres or KEYPOOL_TEST_POSTGRES")
		return 2
	}
	cfg := replConfig{burst: *burstN, budget: *budget, rpmRun: *rpmRun, outage: *outage, workers: *workers, outageRate: *oRate}
	if *short {
		ci := ciReplConfig()
		cfg.rpmRun, cfg.outage, cfg.noisy = ci.rpmRun, ci.outage, ci.noisy
	}
	sel, err := selectReplScenarios(*list)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	dir, cleanup, err := scratchDir("keypool-replicas-", *keep, stdout)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	defer cleanup()
	if *bin == "" {
		fmt.Fprintln(stdout, "building ./cmd/keypoold …")
		if *bin, err = buildKeypoold(ctx, dir); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
	}
	dsn, drop, err := scratchPostgres(ctx, *pg)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	defer drop()
	c, err := startCluster(ctx, *bin, dir, dsn, 3)
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	defer c.close()
	fmt.Fprintf(stdout, "keypool replica suite: 3 keypoold on PostgreSQL + redis-server (loopback), %d CPUs, %d tokens per request\n\n", numCPU(), c.perReq)
	rep := &replReport{out: stdout}
	if err := runReplicaScenarios(ctx, c, cfg, sel, rep); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	if rep.failed() {
		fmt.Fprintln(stdout, "\nresult: FAIL")
		return 1
	}
	fmt.Fprintln(stdout, "\nresult: PASS")
	return 0
}
