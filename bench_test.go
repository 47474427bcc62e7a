package keypool

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

func benchPool(b *testing.B, n int, cooling float64) *Pool {
	b.Helper()
	p, err := New(Config{})
	if err != nil {
		b.Fatal(err)
	}
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = Key{ID: fmt.Sprintf("k%d", i), Secret: Secret(fmt.Sprintf("sk-%032d", i))}
	}
	if err := p.SetService(Service{Name: "svc"}, keys); err != nil {
		b.Fatal(err)
	}
	cool := int(float64(n) * cooling)
	now := time.Now()
	for i := 0; i < cool; i++ {
		p.SetKeyState("svc", keys[i].ID, StateCooling, now.Add(time.Hour), "bench")
	}
	return p
}

func BenchmarkAcquireRelease(b *testing.B) {
	for _, n := range []int{10, 1000, 100000} {
		for _, cooling := range []float64{0, 0.99} {
			name := fmt.Sprintf("keys=%d/cooling=%.0f%%", n, cooling*100)
			b.Run(name+"/serial", func(b *testing.B) {
				p := benchPool(b, n, cooling)
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					l, err := p.Acquire("svc", Request{})
					if err != nil {
						b.Fatal(err)
					}
					l.Release(Outcome{})
				}
			})
			b.Run(name+"/parallel", func(b *testing.B) {
				p := benchPool(b, n, cooling)
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						l, err := p.Acquire("svc", Request{})
						if err != nil {
							panic(err)
						}
						l.Release(Outcome{})
					}
				})
			})
		}
	}
}

// BenchmarkMemoryPerKey reports the live heap per key for 100 000 keys.
func BenchmarkMemoryPerKey(b *testing.B) {
	for i := 0; i < b.N; i++ {
		var before, after runtime.MemStats
		keys := make([]Key, 100000)
		for i := range keys {
			keys[i] = Key{ID: fmt.Sprintf("key_%08d", i), Secret: Secret(fmt.Sprintf("sk-%048d", i)), RateLimitRPM: 60}
		}
		runtime.GC()
		runtime.ReadMemStats(&before)
		p, _ := New(Config{})
		if err := p.SetService(Service{Name: "svc"}, keys); err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/100000, "B/key")
		runtime.KeepAlive(p)
		runtime.KeepAlive(keys)
	}
}

// BenchmarkSelectors is one Acquire and Release of 10 keys with each
// built-in selector (with an affinity for sticky).
func BenchmarkSelectors(b *testing.B) {
	for _, name := range SelectorNames {
		b.Run(name, func(b *testing.B) {
			p := benchPool(b, 10, 0)
			sel, err := ParseSelector(name)
			if err != nil {
				b.Fatal(err)
			}
			svc, _ := p.Service("svc")
			svc.Selector = sel
			keys := make([]Key, 10)
			for i := range keys {
				keys[i] = Key{ID: fmt.Sprintf("k%d", i), Secret: Secret(fmt.Sprintf("sk-%032d", i)), Weight: i + 1, Priority: i % 3}
			}
			if err := p.SetService(svc, keys); err != nil {
				b.Fatal(err)
			}
			r := Request{Affinity: "user-42"}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				l, err := p.Acquire("svc", r)
				if err != nil {
					b.Fatal(err)
				}
				l.Release(Outcome{})
			}
		})
	}
}
