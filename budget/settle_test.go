package budget_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/store"
)

// roundTrips is a go-redis hook counting the round trips a client makes
// (a command, or a pipeline).
type roundTrips struct{ n atomic.Int64 }

func (h *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmd)
	}
}

func (h *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmds)
	}
}

// privateRedis returns a Redis backend on a private redis-server (see
// testutil.StartRedis) whose client counts its round trips in trips, and
// the function that kills the server.
func privateRedis(t *testing.T, trips *roundTrips) (*limit.Redis, func()) {
	t.Helper()
	url, kill := testutil.StartRedis(t, 0)
	c, err := limit.NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.AddHook(trips)
	r, err := limit.NewRedis(c, limit.RedisConfig{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, kill
}

// TestSettleOnRedisIsOneRoundTrip pins issue 9's "1 round trip to
// settle": a request holding reservations on its token's TPM and token
// budgets and its team's cost budget, and charging its team's tokens and
// its service's tokens and cost without a budget, settles every counter
// in one round trip to Redis, and each counter is charged once.
func TestSettleOnRedisIsOneRoundTrip(t *testing.T) {
	trips := &roundTrips{}
	r, _ := privateRedis(t, trips)
	b := budget.New(r, budget.Config{})
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	scopes := [budget.NumKinds]*budget.Scope{
		budget.Token:   b.Scope(budget.Token, "tk", &store.Limits{TPMLimit: 10000, LimitTokensDayBlock: 5000}),
		budget.Team:    b.Scope(budget.Team, "tm", &store.Limits{LimitCostDayBlock: 10}),
		budget.Service: budget.NewScope(budget.Service, "sv", &store.Limits{}),
	}
	ctx := context.Background()
	for i := range 2 { // the first settle loads the script (EVALSHA, then EVAL)
		var h budget.Holds
		if err := b.Reserve(ctx, &h, scopes, 100, 1, now); err != nil {
			t.Fatalf("Reserve: %v", err)
		}
		before := trips.n.Load()
		b.Settle(&h, 40, 0.5, now)
		if got := trips.n.Load() - before; i == 1 && got != 1 {
			t.Errorf("settle took %d round trips to Redis, want 1", got)
		}
	}
	for _, w := range []struct {
		key  string
		want float64
	}{
		{"tok:token:tk", 80}, {"tpm:token:tk", 80}, {"usd:team:tm", 1},
		{"tok:team:tm", 80}, {"tok:service:sv", 80}, {"usd:service:sv", 1},
		{"usd:token:tk", 1},
	} {
		if u, err := r.Usage(ctx, w.key, limit.Day, now); err != nil || u != w.want {
			t.Errorf("%s day usage = %v, %v; want %v", w.key, u, err, w.want)
		}
	}
}

// TestSeedOnRedisFailsOnAFailedWriteAndCountsOnceWhenRetried pins the
// re-seed after Redis restarts empty: a seed whose writes fail is an
// error (it is retried, not marked done with counters missing), and a
// seed retried after writes that landed counts the stored usage once.
func TestSeedOnRedisFailsOnAFailedWriteAndCountsOnceWhenRetried(t *testing.T) {
	r, kill := privateRedis(t, &roundTrips{})
	b := budget.New(r, budget.Config{})
	now := time.Date(2026, 3, 1, 12, 30, 0, 0, time.UTC)
	rows := usageRows{
		{Group: map[string]string{store.GroupToken: "tk", store.GroupTeam: "tm", store.GroupService: "sv"}, TokensIn: 300, TokensOut: 100, Cost: 2},
		{Group: map[string]string{store.GroupToken: "tk2", store.GroupTeam: "tm", store.GroupService: "sv"}, TokensIn: 500, Cost: 1},
	}
	ctx := context.Background()
	for range 2 {
		if n, err := b.Seed(ctx, rows, now); err != nil || n != 4 {
			t.Fatalf("Seed = %d, %v; want 4 scopes", n, err)
		}
	}
	for key, want := range map[string]float64{"tok:token:tk": 400, "tok:team:tm": 900, "usd:service:sv": 3} {
		// The fake returns the rows for every window: the hour holds
		// them, the earlier parts nothing.
		if u, err := r.Usage(ctx, key, limit.Hour, now); err != nil || u != want {
			t.Errorf("%s hour usage after two seeds = %v, %v; want %v", key, u, err, want)
		}
		if u, err := r.Usage(ctx, key, limit.Total, now); err != nil || u != want {
			t.Errorf("%s total usage after two seeds = %v, %v; want %v", key, u, err, want)
		}
	}
	kill()
	if _, err := b.Seed(ctx, rows, now); !errors.Is(err, limit.ErrUnavailable) {
		t.Errorf("Seed with Redis down = %v, want an error wrapping limit.ErrUnavailable", err)
	}
}
