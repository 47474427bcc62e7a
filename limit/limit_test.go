package limit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// t0 is a fixed fake "now": Monday 2025-03-10 12:00:00 UTC.
var t0 = time.Date(2025, 3, 10, 12, 0, 0, 0, time.UTC)

// backends returns the backends to run the shared tests against: Local
// always, Redis when KEYPOOL_TEST_REDIS is set.
func backends(t *testing.T) map[string]func(t *testing.T) Backend {
	m := map[string]func(t *testing.T) Backend{
		"local": func(t *testing.T) Backend {
			b, err := NewLocal(LocalConfig{})
			if err != nil {
				t.Fatal(err)
			}
			return b
		},
	}
	if url := os.Getenv("KEYPOOL_TEST_REDIS"); url != "" {
		m["redis"] = func(t *testing.T) Backend { return newTestRedis(t, url, RedisConfig{}) }
	}
	return m
}

// newTestRedis returns a Redis backend under a random key prefix, whose
// keys are deleted when the test ends.
func newTestRedis(t testing.TB, url string, cfg RedisConfig) *Redis {
	t.Helper()
	c, err := NewRedisClient(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Prefix = fmt.Sprintf("keypool-test:%x:", rand.Uint64())
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second // generous: -race and 200 goroutines
	}
	b, err := NewRedis(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		iter := c.Scan(ctx, 0, cfg.Prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			c.Del(ctx, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		b.Close()
		c.Close()
	})
	return b
}

func newBenchRedis(b *testing.B, url string) *Redis { return newTestRedis(b, url, RedisConfig{}) }

func TestBackends(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) { testBackend(t, newB) })
	}
}

// testBackend is the conformance suite every Backend passes.
func testBackend(t *testing.T, newB func(t *testing.T) Backend) {
	ctx := context.Background()
	sec := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	near := func(t *testing.T, got, want time.Duration) {
		t.Helper()
		if d := got - want; d < -time.Millisecond || d > time.Millisecond {
			t.Errorf("RetryAfter = %v, want %v", got, want)
		}
	}

	t.Run("rpm", func(t *testing.T) {
		type step struct {
			at    float64 // seconds after t0
			ok    bool
			retry float64 // seconds, when refused
		}
		for _, tc := range []struct {
			name  string
			limit int
			steps []step
		}{
			{"five then refuse", 5, []step{
				{0, true, 0}, {1, true, 0}, {2, true, 0}, {3, true, 0}, {4, true, 0},
				{10, false, 50}, {59.999, false, 0.001},
				{60, true, 0}, // the admission at 0 left the window
				{60.5, false, 0.5}, {61, true, 0}, {61, false, 1},
			}},
			{"one per minute", 1, []step{
				{0, true, 0}, {30, false, 30}, {60, true, 0}, {119, false, 1}, {120, true, 0},
			}},
			{"burst at one instant", 3, []step{
				{5, true, 0}, {5, true, 0}, {5, true, 0}, {5, false, 60}, {64.9, false, 0.1}, {65, true, 0},
			}},
			{"unlimited", 0, []step{{0, true, 0}, {0, true, 0}, {0, true, 0}}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				b := newB(t)
				for i, s := range tc.steps {
					d, err := b.Allow(ctx, "team:a", tc.limit, sec(s.at))
					if err != nil {
						t.Fatal(err)
					}
					if d.Allowed != s.ok {
						t.Fatalf("step %d at %vs: Allowed = %v, want %v (%+v)", i, s.at, d.Allowed, s.ok, d)
					}
					if !s.ok {
						near(t, d.RetryAfter, time.Duration(s.retry*float64(time.Second)))
						if d.Limit != (Limit{Window: Minute, Block: float64(tc.limit)}) || d.Used != float64(tc.limit) {
							t.Errorf("step %d: Limit, Used = %+v, %v", i, d.Limit, d.Used)
						}
					}
				}
				// Another key is not affected.
				if d, _ := b.Allow(ctx, "team:b", 1, sec(5)); !d.Allowed {
					t.Errorf("other key refused")
				}
			})
		}
	})

	t.Run("rpm any minute", func(t *testing.T) {
		// Random arrivals: never more than limit admissions in any
		// minute, and a refusal only when limit admissions are in the
		// minute before it.
		b := newB(t)
		const limit = 5
		rng := rand.New(rand.NewPCG(1, 2))
		at := t0
		var admitted []time.Time
		for range 300 {
			at = at.Add(time.Duration(rng.Int64N(int64(8 * time.Second))))
			d, err := b.Allow(ctx, "k", limit, at)
			if err != nil {
				t.Fatal(err)
			}
			inWindow := 0
			for _, a := range admitted {
				if at.Sub(a) < RateWindow {
					inWindow++
				}
			}
			if d.Allowed != (inWindow < limit) {
				t.Fatalf("at %v: Allowed = %v with %d in window", at.Sub(t0), d.Allowed, inWindow)
			}
			if d.Allowed {
				admitted = append(admitted, at)
			} else {
				oldest := admitted[len(admitted)-limit]
				near(t, d.RetryAfter, oldest.Add(RateWindow).Sub(at))
			}
		}
	})

	t.Run("calendar turnover", func(t *testing.T) {
		for _, tc := range []struct {
			name         string
			w            Window
			before, next time.Time
		}{
			{"day", Day, time.Date(2025, 3, 10, 23, 59, 0, 0, time.UTC), time.Date(2025, 3, 11, 0, 0, 0, 0, time.UTC)},
			{"hour", Hour, time.Date(2025, 3, 10, 13, 59, 59, 0, time.UTC), time.Date(2025, 3, 10, 14, 0, 0, 0, time.UTC)},
			{"month", Month, time.Date(2025, 2, 28, 23, 59, 30, 0, time.UTC), time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)},
			{"month leap", Month, time.Date(2024, 2, 29, 23, 0, 0, 0, time.UTC), time.Date(2024, 3, 1, 0, 0, 0, 0, time.UTC)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				b := newB(t)
				lim := []Limit{{Window: tc.w, Block: 1000}}
				charged := tc.before.Add(-30 * time.Minute).Truncate(time.Hour)
				if tc.w == Hour {
					charged = tc.before.Add(-10 * time.Minute)
				}
				if err := b.Add(ctx, "team:a", 1000, charged); err != nil {
					t.Fatal(err)
				}
				_, d, err := b.Reserve(ctx, "team:a", 1, lim, tc.before)
				if err != nil {
					t.Fatal(err)
				}
				if d.Allowed || d.Limit != lim[0] || d.Used != 1000 {
					t.Fatalf("before turnover: %+v", d)
				}
				near(t, d.RetryAfter, tc.next.Sub(tc.before))
				// A zero estimate is refused too: the budget is spent.
				if _, d, _ := b.Reserve(ctx, "team:a", 0, lim, tc.before); d.Allowed {
					t.Fatalf("zero estimate admitted on a spent budget")
				}
				if u, _ := b.Usage(ctx, "team:a", tc.w, tc.before); u != 1000 {
					t.Errorf("usage before = %v", u)
				}
				_, d, err = b.Reserve(ctx, "team:a", 1, lim, tc.next)
				if err != nil || !d.Allowed {
					t.Fatalf("after turnover: %+v, %v", d, err)
				}
				if u, _ := b.Usage(ctx, "team:a", tc.w, tc.next); u != 0 {
					t.Errorf("usage after = %v", u)
				}
				if u, _ := b.Usage(ctx, "team:a", Total, tc.next); u != 1000 {
					t.Errorf("total = %v", u)
				}
			})
		}
	})

	t.Run("concurrent reservations", func(t *testing.T) {
		b := newB(t)
		lim := []Limit{{Window: Day, Block: 50}, {Window: Month, Warn: 10, Block: 1000}}
		var admitted atomic.Int64
		var wg sync.WaitGroup
		res := make(chan Reservation, 200)
		for range 200 {
			wg.Go(func() {
				r, d, err := b.Reserve(ctx, "team:c", 1, lim, t0)
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					admitted.Add(1)
					res <- r
				} else if d.Limit.Window != Day {
					t.Errorf("refused by %+v", d.Limit)
				}
			})
		}
		wg.Wait()
		close(res)
		if n := admitted.Load(); n != 50 {
			t.Fatalf("admitted %d of 200 against a budget of 50, want 50", n)
		}
		for r := range res {
			if err := b.Settle(ctx, r, 1, t0); err != nil {
				t.Fatal(err)
			}
		}
		if u, _ := b.Usage(ctx, "team:c", Day, t0); u != 50 {
			t.Errorf("usage = %v, want 50", u)
		}
		if _, d, _ := b.Reserve(ctx, "team:c", 1, lim, t0); d.Allowed {
			t.Errorf("admitted after budget spent")
		}
	})

	t.Run("warn never blocks", func(t *testing.T) {
		b := newB(t)
		warnOnly := []Limit{{Window: Day, Warn: 10}}
		for i, amount := range []float64{5, 5, 50, 500} {
			r, d, err := b.Reserve(ctx, "tok:w", amount, warnOnly, t0)
			if err != nil || !d.Allowed {
				t.Fatalf("reserve %d: %+v, %v", i, d, err)
			}
			wantWarn := i >= 1
			if d.Warn != wantWarn {
				t.Errorf("reserve %d: Warn = %v, want %v", i, d.Warn, wantWarn)
			}
			if d.Warn && d.Limit != warnOnly[0] {
				t.Errorf("reserve %d: Limit = %+v", i, d.Limit)
			}
			b.Settle(ctx, r, amount, t0)
		}
		both := []Limit{{Window: Hour, Warn: 600, Block: 1000}}
		_, d, _ := b.Reserve(ctx, "tok:w", 10, both, t0) // 560 + 10 < 600
		if !d.Allowed || d.Warn {
			t.Errorf("below warn: %+v", d)
		}
		_, d, _ = b.Reserve(ctx, "tok:w", 100, both, t0) // 560+10+100 >= 600
		if !d.Allowed || !d.Warn || d.Used != 670 {
			t.Errorf("past warn: %+v", d)
		}
	})

	t.Run("settle less and more", func(t *testing.T) {
		b := newB(t)
		lim := []Limit{{Window: Day, Block: 150}}
		r, d, err := b.Reserve(ctx, "team:s", 150, lim, t0)
		if err != nil || !d.Allowed || r.Amount() != 150 || r.Key() != "team:s" {
			t.Fatalf("%+v %v", d, err)
		}
		// While held, the reservation counts.
		if _, d, _ := b.Reserve(ctx, "team:s", 1, lim, t0); d.Allowed || d.Used != 150 || d.Reserved != 150 {
			t.Fatalf("reservation not counted: %+v", d)
		}
		if err := b.Settle(ctx, r, 40, t0); err != nil { // less
			t.Fatal(err)
		}
		if err := b.Settle(ctx, r, 40, t0); err != nil { // second settle: no effect
			t.Fatal(err)
		}
		if u, _ := b.Usage(ctx, "team:s", Day, t0); u != 40 {
			t.Fatalf("usage after settling less = %v, want 40", u)
		}
		r2, d, _ := b.Reserve(ctx, "team:s", 110, lim, t0) // 40 + 110 fits exactly
		if !d.Allowed || d.Used != 150 {
			t.Fatalf("exact fit refused: %+v", d)
		}
		b.Settle(ctx, r2, 200, t0) // more than reserved
		if u, _ := b.Usage(ctx, "team:s", Day, t0); u != 240 {
			t.Fatalf("usage after settling more = %v, want 240", u)
		}
		if _, d, _ := b.Reserve(ctx, "team:s", 0, lim, t0); d.Allowed {
			t.Fatalf("admitted over budget")
		}
		// Cancel: Settle(r, 0) releases without charging.
		r3, d, _ := b.Reserve(ctx, "team:s2", 150, lim, t0)
		if !d.Allowed {
			t.Fatal(d)
		}
		b.Settle(ctx, r3, 0, t0)
		if _, d, _ := b.Reserve(ctx, "team:s2", 150, lim, t0); !d.Allowed {
			t.Fatalf("cancelled reservation still held: %+v", d)
		}
		// The zero Reservation settles to nothing.
		if err := b.Settle(ctx, Reservation{}, 5, t0); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("reservation expires", func(t *testing.T) {
		b := newB(t)
		lim := []Limit{{Window: Month, Block: 10}}
		r, d, _ := b.Reserve(ctx, "team:x", 10, lim, t0)
		if !d.Allowed {
			t.Fatal(d)
		}
		if _, d, _ := b.Reserve(ctx, "team:x", 1, lim, t0.Add(14*time.Minute)); d.Allowed {
			t.Fatal("admitted while reservation held")
		}
		if _, d, _ := b.Reserve(ctx, "team:x", 1, lim, t0.Add(16*time.Minute)); !d.Allowed {
			t.Fatalf("reservation not released after its TTL: %+v", d)
		}
		// A late settle still charges.
		b.Settle(ctx, r, 3, t0.Add(20*time.Minute))
		if u, _ := b.Usage(ctx, "team:x", Month, t0.Add(20*time.Minute)); u != 3 {
			t.Errorf("usage = %v, want 3", u)
		}
	})

	t.Run("tpm", func(t *testing.T) {
		b := newB(t)
		tpm := []Limit{{Window: Minute, Block: 100}, {Window: Day, Block: 1e6}}
		r, d, _ := b.Reserve(ctx, "team:t", 0, tpm, t0)
		if !d.Allowed {
			t.Fatal(d)
		}
		b.Settle(ctx, r, 60, t0)
		b.Add(ctx, "team:t", 40, sec(10.5))
		if u, _ := b.Usage(ctx, "team:t", Minute, sec(30)); u != 100 {
			t.Fatalf("minute usage = %v", u)
		}
		_, d, _ = b.Reserve(ctx, "team:t", 0, tpm, sec(30))
		if d.Allowed || d.Limit != tpm[0] {
			t.Fatalf("at tpm: %+v", d)
		}
		// The 60 charged during second 0 count until second 61.
		near(t, d.RetryAfter, 31*time.Second)
		if _, d, _ = b.Reserve(ctx, "team:t", 0, tpm, sec(60.9)); d.Allowed {
			t.Fatalf("admitted before the minute passed")
		}
		_, d, _ = b.Reserve(ctx, "team:t", 50, tpm, sec(61))
		if !d.Allowed {
			t.Fatalf("refused after the minute: %+v", d)
		}
		if u, _ := b.Usage(ctx, "team:t", Minute, sec(72)); u != 0 {
			t.Errorf("minute usage later = %v", u)
		}
		if u, _ := b.Usage(ctx, "team:t", Day, sec(72)); u != 100 {
			t.Errorf("day usage = %v", u)
		}
	})

	t.Run("total never resets", func(t *testing.T) {
		b := newB(t)
		lim := []Limit{{Window: Day, Block: 100}, {Window: Total, Block: 5}}
		b.Add(ctx, "svc:z", 5, t0)
		_, d, _ := b.Reserve(ctx, "svc:z", 1, lim, t0.AddDate(1, 0, 0))
		if d.Allowed || d.Limit.Window != Total || d.RetryAfter != 0 {
			t.Fatalf("%+v", d)
		}
	})

	t.Run("invalid", func(t *testing.T) {
		b := newB(t)
		for _, tc := range []struct {
			name   string
			amount float64
			lim    []Limit
		}{
			{"zero window", 1, []Limit{{Block: 1}}},
			{"negative block", 1, []Limit{{Window: Day, Block: -1}}},
			{"negative amount", -1, nil},
		} {
			if _, _, err := b.Reserve(ctx, "k", tc.amount, tc.lim, t0); !errors.Is(err, ErrInvalidLimit) {
				t.Errorf("%s: err = %v", tc.name, err)
			}
		}
		if _, err := b.Usage(ctx, "k", 0, t0); !errors.Is(err, ErrInvalidLimit) {
			t.Errorf("usage: err = %v", err)
		}
	})
}

func TestLocalCoarseRate(t *testing.T) {
	// Limits above exactRateMax count per second: never more than limit in
	// any minute, refusals at most a second longer than exact.
	b, _ := NewLocal(LocalConfig{})
	ctx := context.Background()
	const limit = exactRateMax + 10
	n := 0
	for i := range limit + 5 {
		d, _ := b.Allow(ctx, "big", limit, t0.Add(time.Duration(i)*time.Millisecond))
		if d.Allowed {
			n++
		} else if d.RetryAfter < 59*time.Second || d.RetryAfter > 61*time.Second {
			t.Fatalf("RetryAfter = %v", d.RetryAfter)
		}
	}
	if n != limit {
		t.Fatalf("admitted %d, want %d", n, limit)
	}
	if d, _ := b.Allow(ctx, "big", limit, t0.Add(60*time.Second)); d.Allowed {
		t.Fatal("admitted before second 0 left the window")
	}
	if d, _ := b.Allow(ctx, "big", limit, t0.Add(61*time.Second)); !d.Allowed {
		t.Fatal("refused after the minute")
	}
	// Lowering the limit to an exact one starts a log.
	if d, _ := b.Allow(ctx, "big", 2, t0.Add(200*time.Second)); !d.Allowed {
		t.Fatal(d)
	}
}

func TestLocalRateLimitChange(t *testing.T) {
	b, _ := NewLocal(LocalConfig{})
	ctx := context.Background()
	for i := range 5 {
		b.Allow(ctx, "k", 5, t0.Add(time.Duration(i)*time.Second))
	}
	// Lowered to 2: the newest two (at 3s and 4s) are kept.
	d, _ := b.Allow(ctx, "k", 2, t0.Add(10*time.Second))
	if d.Allowed || d.RetryAfter != 53*time.Second {
		t.Fatalf("%+v", d)
	}
	// Raised to 10: room for 8 more.
	for i := range 9 {
		d, _ := b.Allow(ctx, "k", 10, t0.Add(11*time.Second))
		if d.Allowed != (i < 8) {
			t.Fatalf("i=%d: %+v", i, d)
		}
	}
}

func TestLocalIdleRateKeysDropped(t *testing.T) {
	b, _ := NewLocal(LocalConfig{MaxRateKeys: localShards * 4})
	ctx := context.Background()
	for i := range 1000 {
		b.Allow(ctx, fmt.Sprint("k", i), 1, t0.Add(time.Duration(i)*time.Second))
	}
	total := 0
	for i := range b.rate {
		total += b.rate[i].lru.Len()
	}
	if total > localShards*4 {
		t.Fatalf("%d rate keys held, bound %d", total, localShards*4)
	}
}

func TestWindowBounds(t *testing.T) {
	ny, _ := time.LoadLocation("America/New_York")
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		w          Window
		now        time.Time
		start, end string
	}{
		{Hour, at("2025-03-10T12:34:56.7Z"), "2025-03-10T12:00:00Z", "2025-03-10T13:00:00Z"},
		{Hour, at("2025-03-10T23:59:59.999Z"), "2025-03-10T23:00:00Z", "2025-03-11T00:00:00Z"},
		{Day, at("2025-03-10T23:59:59Z"), "2025-03-10T00:00:00Z", "2025-03-11T00:00:00Z"},
		{Day, at("2025-03-11T00:00:00Z"), "2025-03-11T00:00:00Z", "2025-03-12T00:00:00Z"},
		{Day, time.Date(2025, 3, 10, 21, 0, 0, 0, ny), "2025-03-11T00:00:00Z", "2025-03-12T00:00:00Z"}, // 01:00 UTC
		{Month, at("2025-12-31T23:59:59Z"), "2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z"},
		{Month, at("2024-02-29T12:00:00Z"), "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"},
		{Minute, at("2025-03-10T12:00:30Z"), "2025-03-10T11:59:30Z", "2025-03-10T12:00:30Z"},
	} {
		t.Run(tc.w.String()+" "+tc.now.String(), func(t *testing.T) {
			s, e := WindowBounds(tc.w, tc.now)
			if !s.Equal(at(tc.start)) || !e.Equal(at(tc.end)) || s.Location() != time.UTC {
				t.Errorf("got [%v, %v), want [%s, %s)", s, e, tc.start, tc.end)
			}
			if tc.w != Minute && calStart(tc.w, tc.now) != s.Unix() {
				t.Errorf("calStart = %d, want %d", calStart(tc.w, tc.now), s.Unix())
			}
		})
	}
	if s, e := WindowBounds(Total, t0); !s.IsZero() || !e.IsZero() {
		t.Errorf("total: %v %v", s, e)
	}
	// Before 1970 the floor division still aligns.
	old := time.Date(1969, 12, 31, 22, 30, 0, 0, time.UTC)
	if got, want := calStart(Hour, old), time.Date(1969, 12, 31, 22, 0, 0, 0, time.UTC).Unix(); got != want {
		t.Errorf("calStart(1969) = %d, want %d", got, want)
	}
}

// TestCalStartMonth checks the arithmetic month start (and end) against
// package time's calendar: every day's first and last second from 1890 to 2110
// (leap years, 1900 and 2100 not leap, 2000 leap, before 1970), and a
// few far dates.
func TestCalStartMonth(t *testing.T) {
	check := func(now time.Time) {
		t.Helper()
		want, end := WindowBounds(Month, now)
		if got := calStart(Month, now); got != want.Unix() {
			t.Fatalf("calStart(Month, %v) = %v, want %v", now, time.Unix(got, 0).UTC(), want)
		}
		if got := calEnd(Month, want.Unix()); got != end.Unix() {
			t.Fatalf("calEnd(Month, %v) = %v, want %v", want, time.Unix(got, 0).UTC(), end)
		}
	}
	for d := time.Date(1890, 1, 1, 0, 0, 0, 0, time.UTC); d.Year() < 2110; d = d.AddDate(0, 0, 1) {
		check(d)
		check(d.Add(24*time.Hour - time.Nanosecond))
	}
	for _, d := range []time.Time{time.Date(-400, 3, 1, 0, 0, 0, 0, time.UTC), time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(1600, 2, 29, 23, 0, 0, 0, time.UTC), time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)} {
		check(d)
	}
}

func TestWindowText(t *testing.T) {
	for w := Minute; w <= Total; w++ {
		b, err := w.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var got Window
		if err := got.UnmarshalText(b); err != nil || got != w {
			t.Errorf("%v: round trip %v, %v", w, got, err)
		}
	}
	if _, err := ParseWindow("week"); !errors.Is(err, ErrInvalidLimit) {
		t.Errorf("week: %v", err)
	}
	if _, err := Window(0).MarshalText(); err == nil {
		t.Error("zero window marshalled")
	}
}

// quietRedis silences go-redis's own logger (it prints every failed dial).
type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

func TestRedisUnreachable(t *testing.T) {
	// Nothing listens on port 1: connection refused, quickly. A stalled
	// server accepts and never answers. Either way the backend applies its
	// fail policy, logs once, and never hangs.
	redis.SetLogger(quietRedis{})
	stalled, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := stalled.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	refused := "redis://127.0.0.1:1/0"
	stall := "redis://" + stalled.Addr().String() + "/0"
	for _, tc := range []struct {
		name       string
		url        string
		cfg        RedisConfig
		wantAllow  bool
		wantBudget bool
	}{
		{"refused fail open (default)", refused, RedisConfig{}, true, true},
		{"refused fail closed", refused, RedisConfig{FailClosedRate: true, FailClosedBudget: true}, false, false},
		{"stalled fail open", stall, RedisConfig{}, true, true},
		{"stalled fail closed", stall, RedisConfig{FailClosedRate: true, FailClosedBudget: true}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			var mu sync.Mutex
			tc.cfg.Logger = slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))
			tc.cfg.Timeout = 50 * time.Millisecond
			c, err := NewRedisClient(tc.url)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			b, err := NewRedis(c, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			start := time.Now()
			for range 3 {
				callStart := time.Now()
				d, err := b.Allow(ctx, "k", 5, t0)
				if el := time.Since(callStart); el > time.Second {
					t.Errorf("Allow took %v with a 50ms timeout", el)
				}
				if err != nil || d.Allowed != tc.wantAllow || !d.Degraded {
					t.Fatalf("Allow: %+v, %v", d, err)
				}
				r, d, err := b.Reserve(ctx, "k", 1, []Limit{{Window: Day, Block: 10}}, t0)
				if err != nil || d.Allowed != tc.wantBudget || !d.Degraded {
					t.Fatalf("Reserve: %+v, %v", d, err)
				}
				if err := b.Settle(ctx, r, 1, t0); d.Allowed && !errors.Is(err, ErrUnavailable) {
					t.Fatalf("Settle: %v", err)
				}
				if _, err := b.Usage(ctx, "k", Day, t0); !errors.Is(err, ErrUnavailable) {
					t.Fatalf("Usage: %v", err)
				}
				res, ds := make([]Reservation, 2), make([]Decision, 2)
				which, err := b.ReserveAll(ctx, []Charge{{"a", 1, nil}, {"b", 1, []Limit{{Window: Day, Block: 10}}}}, res, ds, t0)
				if err != nil || (which < 0) != tc.wantBudget || !ds[0].Degraded {
					t.Fatalf("ReserveAll: %d %+v, %v", which, ds, err)
				}
			}
			if el := time.Since(start); el > 5*time.Second {
				t.Errorf("took %v", el)
			}
			mu.Lock()
			defer mu.Unlock()
			if n := strings.Count(logs.String(), "redis unreachable"); n != 1 {
				t.Errorf("%d warnings logged, want 1:\n%s", n, logs.String())
			}
			// A cancelled caller gets its own error, not a decision.
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			if _, err := b.Allow(cctx, "k", 5, t0); !errors.Is(err, context.Canceled) {
				t.Errorf("cancelled Allow: %v", err)
			}
		})
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestSettleAllChargesEachCounterOnce pins SettleAll on every backend: it
// releases each reservation and charges its actual, charges a counter
// without a reservation, refuses a negative charge while applying the
// rest, and a repeated SettleAll of the same reservation charges nothing
// more.
func TestSettleAllChargesEachCounterOnce(t *testing.T) {
	for name, mk := range backends(t) {
		t.Run(name, func(t *testing.T) {
			b := mk(t)
			defer b.Close()
			ctx := context.Background()
			lims := []Limit{{Window: Day, Block: 100}}
			res, d, err := b.Reserve(ctx, "a", 50, lims, t0)
			if err != nil || !d.Allowed {
				t.Fatalf("Reserve: %+v %v", d, err)
			}
			ss := []Settlement{{Res: res, Actual: 20}, {Key: "b", Actual: 7}, {Key: "c", Actual: -1}}
			if err := b.SettleAll(ctx, ss, t0); !errors.Is(err, ErrInvalidLimit) {
				t.Errorf("SettleAll with a negative charge: %v, want ErrInvalidLimit", err)
			}
			if err := b.SettleAll(ctx, ss[:1], t0); err != nil {
				t.Fatalf("repeated SettleAll: %v", err)
			}
			for key, want := range map[string]float64{"a": 20, "b": 7, "c": 0} {
				if u, err := b.Usage(ctx, key, Day, t0); err != nil || u != want {
					t.Errorf("usage of %s = %v, %v; want %v", key, u, err, want)
				}
			}
			if _, d, _ := b.Reserve(ctx, "a", 80, lims, t0); !d.Allowed || d.Reserved != 80 {
				t.Errorf("after settling, the estimate is still held: %+v", d)
			}
		})
	}
}
