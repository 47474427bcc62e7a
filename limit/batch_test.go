package limit

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/internal/testutil"
)

// scriptRuns is a go-redis hook counting the scripts a client runs
// (EVALSHA, and EVAL when the script was not loaded yet).
type scriptRuns struct{ n atomic.Int64 }

func (h *scriptRuns) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *scriptRuns) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		// A NOSCRIPT EVALSHA is followed by an EVAL: count that one.
		if n := cmd.Name(); (n == "evalsha" || n == "eval") && (err == nil || !redis.HasErrorPrefix(err, "NOSCRIPT")) {
			h.n.Add(1)
		}
		return err
	}
}

func (h *scriptRuns) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestRedisReserveAllBatchesABurst pins the batched admission of issue 9:
// 1 000 concurrent requests over 3 replicas on one Redis, against a budget
// for 100, admit exactly 100 (the batch applies the rule request by
// request, as separate scripts did) in far fewer script runs than
// requests, and their settles take fewer runs than settles too.
func TestRedisReserveAllBatchesABurst(t *testing.T) {
	url, _ := startRedis(t, 0)
	var runs scriptRuns
	reps := make([]*Redis, 3)
	for i := range reps {
		c, err := NewRedisClient(url)
		if err != nil {
			t.Fatal(err)
		}
		c.AddHook(&runs)
		t.Cleanup(func() { c.Close() })
		if reps[i], err = NewRedis(c, RedisConfig{Timeout: 10 * time.Second}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { reps[i].Close() })
	}
	ctx := context.Background()
	lims := []Limit{{Window: Total, Block: 100 * 150}}
	tpm := []Limit{{Window: Minute, Block: 1e9}}
	const n = 1000
	var admitted atomic.Int64
	held := make(chan Reservation, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			charges := []Charge{{"tok:team:t", 150, lims}, {"tpm:team:t", 0, tpm}}
			res, ds := make([]Reservation, 2), make([]Decision, 2)
			which, err := reps[i%3].ReserveAll(ctx, charges, res, ds, t0)
			if err != nil {
				t.Error(err)
				return
			}
			if which == -1 {
				if ds[0].Degraded {
					t.Error("degraded decision with Redis up")
				}
				admitted.Add(1)
				held <- res[0]
			}
		})
	}
	close(start)
	wg.Wait()
	close(held)
	if got := admitted.Load(); got != 100 {
		t.Errorf("admitted %d of %d, want exactly 100", got, n)
	}
	admits := runs.n.Load()
	if admits > n/4 {
		t.Errorf("%d admission scripts for %d concurrent requests, want batches (≤ %d)", admits, n, n/4)
	}
	var swg sync.WaitGroup
	i := 0
	for res := range held {
		r := reps[i%3]
		swg.Go(func() {
			if err := r.SettleAll(ctx, []Settlement{{Res: res, Actual: 150}}, t0); err != nil {
				t.Error(err)
			}
		})
		i++
	}
	swg.Wait()
	if got := rawUsage(t, url, "tok:team:t"); got != 100*150 {
		t.Errorf("counter %v after the settles, want %v", got, 100*150)
	}
	t.Logf("%d requests: %d admission scripts, %d settle scripts for 100 settles", n, admits, runs.n.Load()-admits)
}

// TestRedisBatchedCallerThatLeavesHoldsNothing: a request whose context
// ends while it waits for its admission batch gets its context's error,
// and nothing stays reserved for it.
func TestRedisBatchedCallerThatLeavesHoldsNothing(t *testing.T) {
	url, _ := startRedis(t, 0)
	b := privateRedis(t, url, RedisConfig{Timeout: 5 * time.Second})
	lims := []Limit{{Window: Total, Block: 1000}}
	o, _ := redis.ParseURL(url)
	raw := redis.NewClient(o)
	defer raw.Close()
	// The first calls' batches (as many as may be in flight) are in
	// flight behind a 300 ms stall; the next waits in the queue and
	// leaves after 50 ms.
	go raw.Do(context.Background(), "DEBUG", "SLEEP", "0.3")
	time.Sleep(20 * time.Millisecond)
	first := make(chan error, maxAdmitInFlight)
	for range maxAdmitInFlight {
		go func() {
			res, ds := make([]Reservation, 1), make([]Decision, 1)
			_, err := b.ReserveAll(context.Background(), []Charge{{"k", 10, lims}}, res, ds, t0)
			first <- err
		}()
	}
	time.Sleep(20 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	res, ds := make([]Reservation, 1), make([]Decision, 1)
	if _, err := b.ReserveAll(ctx, []Charge{{"k", 500, lims}}, res, ds, t0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("leaving caller got %v, want its deadline", err)
	}
	for range maxAdmitInFlight {
		if err := <-first; err != nil {
			t.Fatal(err)
		}
	}
	// Only the first calls' 10 each are reserved: wait for the queue to
	// drain.
	want := float64(10 * maxAdmitInFlight)
	if !waitFor(2*time.Second, func() bool {
		v := reservedSum(t, raw, "keypool:limit:{k}:ru")
		return v == want
	}) {
		v := reservedSum(t, raw, "keypool:limit:{k}:ru")
		t.Errorf("reserved %v, want %v (the leaving caller's 500 released or never sent)", v, want)
	}
}

// TestRedisBackFromOutageLooksForSeed: when Redis comes back from an
// outage empty, the watcher asks for the re-seed (OnUnseeded) at once,
// without waiting for a budgeted request to find Redis unseeded.
func TestRedisBackFromOutageLooksForSeed(t *testing.T) {
	url, kill := startRedis(t, 0)
	var kicked atomic.Int64
	b := privateRedis(t, url, RedisConfig{Timeout: 500 * time.Millisecond, FailClosedBudget: true, RequireSeed: true,
		OnUnseeded: func() { kicked.Add(1) }, watchTick: 20 * time.Millisecond})
	ctx := context.Background()
	seed, done, err := b.ClaimSeed(ctx)
	if err != nil || !seed {
		t.Fatalf("ClaimSeed: %v %v", seed, err)
	}
	if err := done(ctx); err != nil {
		t.Fatal(err)
	}
	kill()
	lims := []Limit{{Window: Total, Block: 1e6}}
	for range breakerTrip {
		b.Reserve(ctx, "k", 1, lims, t0)
	}
	if !b.Down() {
		t.Fatal("breaker did not open while Redis was down")
	}
	kicked.Store(0)
	testutil.RestartRedis(t, url)
	if !waitFor(2*time.Second, func() bool { return kicked.Load() > 0 }) {
		t.Fatal("Redis back empty: OnUnseeded not called without a request")
	}
	if b.Down() {
		t.Error("breaker still open after Redis came back")
	}
}

// reservedSum reads what a counter's reserved key (see resvLua) says its
// reservations sum to (0 without the key).
func reservedSum(t *testing.T, c *redis.Client, key string) float64 {
	t.Helper()
	v, err := c.Get(context.Background(), key).Result()
	if errors.Is(err, redis.Nil) {
		return 0
	}
	_, sum, ok := strings.Cut(v, " ")
	f, perr := strconv.ParseFloat(sum, 64)
	if err != nil || !ok || perr != nil {
		t.Fatalf("reserved key %q: %q %v", key, v, err)
	}
	return f
}
