package limit

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

func benchKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("team:%08d", i)
	}
	return keys
}

// BenchmarkLocalAllow measures the hot path: an Allow on one of many keys,
// from every P at once, with time moving forward (admissions and refusals
// both happen).
func BenchmarkLocalAllow(b *testing.B) {
	for _, bc := range []struct {
		name  string
		keys  int
		limit int
	}{
		{"keys=1/rpm=600", 1, 600},
		{"keys=4096/rpm=600", 4096, 600},
		{"keys=4096/rpm=100000", 4096, 100000},
	} {
		b.Run(bc.name, func(b *testing.B) {
			l, _ := NewLocal(LocalConfig{})
			keys := benchKeys(bc.keys)
			ctx := context.Background()
			var seq atomic.Int64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := int(seq.Add(1)) * 7919
				now := t0
				for pb.Next() {
					i++
					now = now.Add(time.Millisecond)
					l.Allow(ctx, keys[i%len(keys)], bc.limit, now)
				}
			})
		})
	}
}

// BenchmarkLocalReserveSettle measures one Reserve and its Settle against
// a day and a month budget.
func BenchmarkLocalReserveSettle(b *testing.B) {
	l, _ := NewLocal(LocalConfig{})
	keys := benchKeys(1024)
	lim := []Limit{{Window: Minute, Block: 1e12}, {Window: Day, Warn: 1e12, Block: 2e12}, {Window: Month, Block: 1e13}}
	ctx := context.Background()
	var seq atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seq.Add(1)) * 7919
		now := t0
		for pb.Next() {
			i++
			now = now.Add(time.Millisecond)
			r, d, _ := l.Reserve(ctx, keys[i%len(keys)], 100, lim, now)
			if d.Allowed {
				l.Settle(ctx, r, 80, now)
			}
		}
	})
}

func BenchmarkRedisAllow(b *testing.B) {
	url := os.Getenv("KEYPOOL_TEST_REDIS")
	if url == "" {
		b.Skip("KEYPOOL_TEST_REDIS not set")
	}
	r := newBenchRedis(b, url)
	keys := benchKeys(256)
	ctx := context.Background()
	var seq atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seq.Add(1)) * 7919
		for pb.Next() {
			i++
			r.Allow(ctx, keys[i%len(keys)], 600, time.Now())
		}
	})
}

func BenchmarkRedisReserveSettle(b *testing.B) {
	url := os.Getenv("KEYPOOL_TEST_REDIS")
	if url == "" {
		b.Skip("KEYPOOL_TEST_REDIS not set")
	}
	r := newBenchRedis(b, url)
	keys := benchKeys(256)
	lim := []Limit{{Window: Minute, Block: 1e12}, {Window: Day, Warn: 1e12, Block: 2e12}}
	ctx := context.Background()
	var seq atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seq.Add(1)) * 7919
		for pb.Next() {
			i++
			now := time.Now()
			res, d, _ := r.Reserve(ctx, keys[i%len(keys)], 100, lim, now)
			if d.Allowed {
				r.Settle(ctx, res, 80, now)
			}
		}
	})
}
