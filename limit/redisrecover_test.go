package limit

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/internal/testutil"
)

// privateRedis returns a backend on the private redis-server at url.
func privateRedis(t *testing.T, url string, cfg RedisConfig) *Redis {
	t.Helper()
	c, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	b, err := NewRedis(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// rawUsage reads a counter's total straight from Redis (0 when missing),
// without going through a backend.
func rawUsage(t *testing.T, url, key string) float64 {
	t.Helper()
	o, _ := redis.ParseURL(url)
	c := redis.NewClient(o)
	defer c.Close()
	v, err := c.Get(context.Background(), "keypool:limit:{"+key+"}:t").Float64()
	if err != nil && err != redis.Nil {
		return -1
	}
	return v
}

// failedOf runs n ReserveAll calls of 1 on key at once on b and returns
// how many were not admitted by Redis (refused, degraded or an error).
func failedOf(b *Redis, n int, key string, lims []Limit) int64 {
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			res, ds := make([]Reservation, 1), make([]Decision, 1)
			which, err := b.ReserveAll(context.Background(), []Charge{{key, 1, lims}}, res, ds, t0)
			if err != nil || which != -1 || ds[0].Degraded {
				failed.Add(1)
			}
		})
	}
	wg.Wait()
	return failed.Load()
}

// waitFor polls cond every 10 ms for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

func TestRedisSettleFailedWhileDownIsReplayedWhenRedisReturns(t *testing.T) {
	url, kill := startRedis(t, 0)
	b := privateRedis(t, url, RedisConfig{Timeout: time.Second, BreakerOpen: 200 * time.Millisecond, FailClosedBudget: true})
	ctx := context.Background()
	lims := []Limit{{Window: Total, Block: 1000}}
	res, ds := make([]Reservation, 1), make([]Decision, 1)
	if which, err := b.ReserveAll(ctx, []Charge{{"team", 10, lims}}, res, ds, t0); err != nil || which != -1 || ds[0].Degraded {
		t.Fatalf("ReserveAll with Redis up: %d %+v %v", which, ds[0], err)
	}
	kill()
	if err := b.Settle(ctx, res[0], 7, t0); err == nil {
		t.Fatal("Settle with Redis killed succeeded")
	}
	testutil.RestartRedis(t, url)
	// No call goes through b: the watcher notices Redis is back and
	// replays the settle on its own.
	if !waitFor(3*time.Second, func() bool { return rawUsage(t, url, "team") == 7 }) {
		t.Fatalf("counter after Redis came back = %v, want the failed settle's 7 replayed", rawUsage(t, url, "team"))
	}
	if b.Down() {
		t.Error("still Down after the watcher reached Redis")
	}
}

func TestRedisHalfOpenBreakerLetsConcurrentCallsThrough(t *testing.T) {
	url, kill := startRedis(t, 0)
	// The watcher never runs here, so the breaker recovers by its own
	// half-open probe.
	b := privateRedis(t, url, RedisConfig{Timeout: 2 * time.Second, BreakerOpen: 100 * time.Millisecond,
		FailClosedBudget: true, watchTick: time.Hour})
	ctx := context.Background()
	lims := []Limit{{Window: Total, Block: 1e6}}
	stall := func(secs string) {
		o, _ := redis.ParseURL(url)
		c := redis.NewClient(o)
		defer c.Close()
		c.Do(context.Background(), "DEBUG", "SLEEP", secs)
	}
	// A hiccup: Redis restarts; three calls fail and open the breaker.
	kill()
	for range breakerTrip {
		b.Reserve(ctx, "k", 1, lims, t0)
	}
	if !b.Down() {
		t.Fatal("breaker did not open while Redis was down")
	}
	testutil.RestartRedis(t, url)
	time.Sleep(150 * time.Millisecond) // open period over: half-open next
	// The probe is slowed (50 ms, below Timeout) so that the concurrent calls
	// arrive while it is in flight.
	go stall("0.05")
	time.Sleep(10 * time.Millisecond)
	if n := failedOf(b, 100, "k", lims); n != 0 {
		t.Errorf("%d of 100 calls during the half-open probe got the fail policy, want 0", n)
	}
}

func TestRedisReserveAllWaitsForTheSeed(t *testing.T) {
	url, _ := startRedis(t, 0)
	b := privateRedis(t, url, RedisConfig{Timeout: 2 * time.Second, FailClosedBudget: true, RequireSeed: true, SeedWait: 2 * time.Second})
	var kicked atomic.Int64
	b.cfg.OnUnseeded = func() { kicked.Add(1) }
	ctx := context.Background()
	lims := []Limit{{Window: Total, Block: 1e6}}
	// Another replica seeds 200 ms after the burst starts.
	go func() {
		time.Sleep(200 * time.Millisecond)
		seed, done, err := b.ClaimSeed(ctx)
		if err != nil || !seed {
			t.Errorf("ClaimSeed: %v %v", seed, err)
			return
		}
		if err := done(ctx); err != nil {
			t.Error(err)
		}
	}()
	if n := failedOf(b, 300, "k", lims); n != 0 {
		t.Errorf("%d of 300 calls refused while the seed was under way, want 0 (they wait for it)", n)
	}
	if kicked.Load() == 0 {
		t.Error("OnUnseeded not called")
	}
	// No seed at all: the wait is bounded, then the fail policy.
	b2 := privateRedis(t, url, RedisConfig{FailClosedBudget: true, RequireSeed: true, SeedWait: 100 * time.Millisecond,
		Prefix: "other:"})
	res, ds := make([]Reservation, 1), make([]Decision, 1)
	start := time.Now()
	if which, err := b2.ReserveAll(ctx, []Charge{{"k", 1, lims}}, res, ds, t0); err != nil || which != 0 || !ds[0].Degraded {
		t.Errorf("unseeded for good: %d %+v %v, want refused, degraded", which, ds[0], err)
	}
	if el := time.Since(start); el > time.Second {
		t.Errorf("unseeded call took %v, want about SeedWait", el)
	}
}

// TestRedisLocalShareBoundsOutageAcrossReplicas: 3 replicas on one Redis
// with the local fail policy; a budget of 1 000 has 700 left when Redis is
// killed; 900 concurrent requests over the 3 during the outage admit at
// most the documented R + D + N × a_max, and about R (not 0: not closed;
// not 900: not open). The settlements of the outage are replayed on the
// restarted Redis.
func TestRedisLocalShareBoundsOutageAcrossReplicas(t *testing.T) {
	url, kill := startRedis(t, 0)
	var reps []*Redis
	for range 3 {
		reps = append(reps, privateRedis(t, url, RedisConfig{Timeout: 100 * time.Millisecond, BreakerOpen: time.Hour,
			FailLocalBudget: true, FailClosedBudget: true, watchTick: 20 * time.Millisecond}))
	}
	ctx := context.Background()
	lims := []Limit{{Window: Total, Block: 1000}}
	reserve := func(b *Redis, key string) (Reservation, Decision) {
		res, ds := make([]Reservation, 1), make([]Decision, 1)
		which, err := b.ReserveAll(ctx, []Charge{{key, 1, lims}}, res, ds, t0)
		if err != nil {
			t.Fatal(err)
		}
		if which >= 0 {
			return Reservation{}, ds[0]
		}
		return res[0], ds[0]
	}
	if !waitFor(3*time.Second, func() bool {
		for _, b := range reps {
			if b.Replicas() != 3 {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("replicas counted: %d %d %d, want 3", reps[0].Replicas(), reps[1].Replicas(), reps[2].Replicas())
	}
	for i := range 300 {
		b := reps[i%3]
		r, d := reserve(b, "team")
		if !d.Allowed || d.Degraded {
			t.Fatalf("request %d with Redis up: %+v", i, d)
		}
		if err := b.Settle(ctx, r, 1, t0); err != nil {
			t.Fatal(err)
		}
	}
	const room, stale, bound = 700, 2, 3 // the replicas last saw 702, 701 and 700 left
	kill()
	var admitted, other atomic.Int64
	var wg sync.WaitGroup
	for i := range 900 {
		wg.Go(func() {
			b := reps[i%3]
			r, d := reserve(b, "team")
			switch {
			case d.Allowed && d.Degraded:
				admitted.Add(1)
				_ = b.Settle(ctx, r, 1, t0) // fails: queued for replay
			case d.Allowed || !d.Degraded:
				other.Add(1)
			}
		})
	}
	wg.Wait()
	n := admitted.Load()
	t.Logf("900 concurrent requests over 3 replicas with Redis down, %d left: %d admitted on local shares", room, n)
	if n > room+stale+bound || n < room-bound {
		t.Errorf("admitted %d during the outage, want %d ≤ n ≤ %d + %d + %d", n, room-bound, room, stale, bound)
	}
	if other.Load() != 0 {
		t.Errorf("%d decisions neither local admissions nor degraded refusals", other.Load())
	}
	// A counter no replica has seen is refused (closed).
	if _, d := reserve(reps[0], "unseen"); d.Allowed || !d.Degraded {
		t.Errorf("unseen counter during the outage: %+v, want refused", d)
	}
	// Redis restarted empty: the outage's settlements are replayed
	// (BreakerOpen is an hour: only the watcher can notice Redis is back).
	testutil.RestartRedis(t, url)
	if !waitFor(5*time.Second, func() bool { return rawUsage(t, url, "team") == float64(n) }) {
		t.Errorf("counter on the restarted Redis = %v, want the %d settlements of the outage", rawUsage(t, url, "team"), n)
	}
}

// TestRedisReplayDropsSettlesTheReseedCounts: with RequireSeed, a settle
// that failed before Redis restarted empty and was re-seeded from the
// usage records is not replayed (the seed counts the request: replaying
// would count it twice); one that failed while Redis kept its data (a
// stall) is.
func TestRedisReplayDropsSettlesTheReseedCounts(t *testing.T) {
	url, kill := startRedis(t, 0)
	b := privateRedis(t, url, RedisConfig{Timeout: 100 * time.Millisecond, BreakerOpen: time.Hour, RequireSeed: true, FailClosedBudget: true})
	ctx := context.Background()
	seed := func() {
		t.Helper()
		ok, done, err := b.ClaimSeed(ctx)
		if err != nil || !ok {
			t.Fatalf("ClaimSeed: %v %v", ok, err)
		}
		if err := done(ctx); err != nil {
			t.Fatal(err)
		}
	}
	seed()
	lims := []Limit{{Window: Total, Block: 1000}}
	reserve := func() Reservation {
		t.Helper()
		res, ds := make([]Reservation, 1), make([]Decision, 1)
		if which, err := b.ReserveAll(ctx, []Charge{{"team", 10, lims}}, res, ds, time.Now()); err != nil || which != -1 || ds[0].Degraded {
			t.Fatalf("ReserveAll: %d %+v %v", which, ds[0], err)
		}
		return res[0]
	}
	// A stall: the settle times out, Redis keeps its data; replayed.
	r1 := reserve()
	o, _ := redis.ParseURL(url)
	stall := redis.NewClient(o)
	defer stall.Close()
	go stall.Do(context.Background(), "DEBUG", "SLEEP", "0.3")
	time.Sleep(30 * time.Millisecond)
	if err := b.Settle(ctx, r1, 7, time.Now()); err == nil {
		t.Fatal("Settle during the stall succeeded")
	}
	if !waitFor(3*time.Second, func() bool { return rawUsage(t, url, "team") == 7 }) {
		t.Fatalf("counter after the stall = %v, want 7 (the settle replayed)", rawUsage(t, url, "team"))
	}
	// A restart-empty and a re-seed: the settle made before is dropped.
	r2 := reserve()
	kill()
	if err := b.Settle(ctx, r2, 5, time.Now()); err == nil {
		t.Fatal("Settle with Redis killed succeeded")
	}
	time.Sleep(5 * time.Millisecond) // the seed is later than the settle
	testutil.RestartRedis(t, url)
	// The watcher's failed replays may have opened the breaker while
	// Redis restarted (slow on a loaded machine): it closes it.
	waitFor(2*time.Second, func() bool { return !b.Down() })
	seed()
	time.Sleep(500 * time.Millisecond) // the watcher replays within ~100 ms
	if u := rawUsage(t, url, "team"); u != 0 {
		t.Errorf("counter after restart and re-seed = %v, want 0: the seed counts that request, the replay must not", u)
	}
}
