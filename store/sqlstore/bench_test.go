package sqlstore

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
)

// BenchmarkUsageWriter measures UsageWriter → AppendUsage into SQLite,
// reported as rows/s.
func BenchmarkUsageWriter(b *testing.B) {
	ctx := context.Background()
	s := openAt(b, sqliteDSN(b), Options{})
	w := store.NewUsageWriter(s, store.UsageWriterOptions{Retention: -1, Logger: quiet})
	rec := store.UsageRecord{
		TeamID: "team_abcdefghijklmnopqrstuvwxyz", TokenID: "tok_abcdefghijklmnopqrstuvwxyz",
		Service: "openai", KeyID: "key_abcdefghijklmnopqrstuvwxyz", Model: "gpt-4o-mini",
		Status: 200, TokensIn: 512, TokensOut: 128, Cost: 0.0012, LatencyMS: 340,
	}
	b.ReportAllocs()
	start := time.Now()
	for i := 0; b.Loop(); i++ {
		rec.Time = start.Add(time.Duration(i) * time.Millisecond)
		w.Add(rec)
	}
	if err := w.Close(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(w.Written())/time.Since(start).Seconds(), "rows/s")
	if w.Dropped() != 0 {
		b.Fatalf("dropped %d", w.Dropped())
	}
}

// BenchmarkAppendUsage measures AppendUsage of 1000-row batches.
func BenchmarkAppendUsage(b *testing.B) {
	ctx := context.Background()
	s := openAt(b, sqliteDSN(b), Options{})
	recs := make([]store.UsageRecord, 1000)
	for i := range recs {
		recs[i] = store.UsageRecord{Time: time.Now(), TeamID: "team_x", Service: "openai", KeyID: "key_x", Model: "m", Status: 200, TokensIn: 10}
	}
	start := time.Now()
	n := 0
	for b.Loop() {
		if err := s.AppendUsage(ctx, recs); err != nil {
			b.Fatal(err)
		}
		n += len(recs)
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "rows/s")
}

// seed100k returns a SQLite store holding 100 000 keys over four services.
func seed100k(b *testing.B) *Store {
	b.Helper()
	const n = 100_000
	ctx := context.Background()
	s := openAt(b, sqliteDSN(b), Options{Keyring: testKeyring(b)})
	services := []string{"openai", "groq", "exa", "tavily"}
	for _, name := range services {
		if err := s.CreateService(ctx, &store.Service{Name: name, BaseURL: "https://" + name}); err != nil {
			b.Fatal(err)
		}
	}
	for off := 0; off < n; off += 10_000 {
		keys := make([]*store.Key, 10_000)
		for i := range keys {
			keys[i] = &store.Key{
				Service: services[(off+i)%4], Secret: keypool.Secret(fmt.Sprintf("sk-proj-%08d-0123456789abcdef0123456789abcdef", off+i)),
				Weight: 1, Labels: map[string]string{"tier": "pro"}, BalanceTotal: 5, BalanceUnit: "usd",
				AccountEmail: fmt.Sprintf("user%d@example.com", off+i),
			}
		}
		if err := s.CreateKeys(ctx, keys); err != nil {
			b.Fatal(err)
		}
	}
	return s
}

// BenchmarkKeys100k measures loading 100 000 keys (opening every secret)
// from SQLite.
func BenchmarkKeys100k(b *testing.B) {
	s := seed100k(b)
	b.ReportAllocs()
	for b.Loop() {
		ks, err := s.Keys(context.Background(), "")
		if err != nil {
			b.Fatal(err)
		}
		if len(ks) != 100_000 {
			b.Fatalf("%d keys", len(ks))
		}
	}
}

// BenchmarkLoadPool100k measures a cold start: 100 000 keys from SQLite
// into a fresh keypool.Pool through the Syncer.
func BenchmarkLoadPool100k(b *testing.B) {
	s := seed100k(b)
	b.ReportAllocs()
	for b.Loop() {
		pool, err := keypool.New(keypool.Config{})
		if err != nil {
			b.Fatal(err)
		}
		if err := store.NewSyncer(pool, s, store.SyncerOptions{}).Load(context.Background()); err != nil {
			b.Fatal(err)
		}
		if st, _ := pool.Stats("exa"); len(st) != 25_000 {
			b.Fatalf("exa has %d keys", len(st))
		}
	}
}
