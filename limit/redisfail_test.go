package limit

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/internal/testutil"
)

// startRedis starts a private redis-server (see [testutil.StartRedis]).
func startRedis(t *testing.T, port int) (string, func()) { return testutil.StartRedis(t, port) }

func TestRedisBreakerPaysTimeoutOncePerWindow(t *testing.T) {
	url, kill := startRedis(t, 0)
	c, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var logs bytes.Buffer
	var mu sync.Mutex
	b, err := NewRedis(c, RedisConfig{Timeout: 100 * time.Millisecond, BreakerOpen: time.Hour, FailClosedBudget: true,
		Logger: slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	lims := []Limit{{Window: Day, Block: 10}}
	if _, d, err := b.Reserve(ctx, "k", 1, lims, t0); err != nil || !d.Allowed || d.Degraded {
		t.Fatalf("Reserve with Redis up: %+v %v", d, err)
	}
	// Stall Redis: every call now times out, but only the first pays.
	stall, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close()
	go stall.Do(context.Background(), "DEBUG", "SLEEP", "3")
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	var wg sync.WaitGroup
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, d, err := b.Reserve(ctx, "k", 1, lims, t0)
			if err != nil || d.Allowed || !d.Degraded {
				t.Errorf("Reserve while stalled: %+v %v (want refused, degraded)", d, err)
			}
			if d, err := b.Allow(ctx, "k", 100, t0); err != nil || !d.Allowed || !d.Degraded {
				t.Errorf("Allow while stalled: %+v %v (want admitted, degraded)", d, err)
			}
		}()
	}
	wg.Wait()
	for range 200 {
		_, _, _ = b.Reserve(ctx, "k", 1, lims, t0)
	}
	if el := time.Since(start); el > 600*time.Millisecond {
		t.Errorf("600 calls while Redis stalls took %v: more than one timeout paid", el)
	}
	if !b.Down() || b.Failures() < 600 {
		t.Errorf("Down %v, Failures %d", b.Down(), b.Failures())
	}
	kill()
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(logs.String(), "redis unreachable"); n != 1 {
		t.Errorf("%d warnings, want 1 per outage:\n%s", n, logs.String())
	}
}

func TestRedisSettleIdempotentAndLostReplyReleased(t *testing.T) {
	url, _ := startRedis(t, 0)
	c, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, err := NewRedis(c, RedisConfig{Timeout: 100 * time.Millisecond, BreakerOpen: 50 * time.Millisecond, FailClosedBudget: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	lims := []Limit{{Window: Day, Block: 100}}

	// A settle replayed (retried, or late) charges once.
	res, d, err := b.Reserve(ctx, "k", 10, lims, t0)
	if err != nil || !d.Allowed {
		t.Fatalf("Reserve: %+v %v", d, err)
	}
	for range 3 {
		if err := b.settleMany(ctx, "settle", []orphan{{key: "k", member: res.member, part: res.part, held: res.amount, actual: 7, at: t0}}); err != nil {
			t.Fatal(err)
		}
	}
	if u, err := b.Usage(ctx, "k", Day, t0); err != nil || u != 7 {
		t.Fatalf("usage after 3 settles of one reservation = %v, %v; want 7", u, err)
	}

	// A reserve whose reply is lost (Redis runs it after the client gave
	// up) is released once Redis answers again.
	stall, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close()
	done := make(chan struct{})
	go func() { stall.Do(context.Background(), "DEBUG", "SLEEP", "0.3"); close(done) }()
	time.Sleep(30 * time.Millisecond)
	res2, ds := make([]Reservation, 1), make([]Decision, 1)
	which, err := b.ReserveAll(ctx, []Charge{{"k", 20, lims}}, res2, ds, t0)
	if err != nil || which != 0 || !ds[0].Degraded {
		t.Fatalf("ReserveAll while stalled: %d %+v %v (want refused, degraded)", which, ds, err)
	}
	<-done
	// Redis ran the queued script after its sleep: 20 is held. The next
	// successful call releases it.
	deadline := time.Now().Add(3 * time.Second)
	for {
		_, d, err := b.Reserve(ctx, "other", 0, lims, t0)
		if err == nil && !d.Degraded {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Redis did not come back")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for {
		_, d, err := b.Reserve(ctx, "k", 0, lims, t0)
		if err != nil {
			t.Fatal(err)
		}
		if d.Reserved == 0 && b.released.Load() >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lost reservation still held: reserved %v, released %d", d.Reserved, b.released.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if u, err := b.Usage(ctx, "k", Day, t0); err != nil || u != 7 {
		t.Fatalf("usage = %v, %v; want 7", u, err)
	}
}
