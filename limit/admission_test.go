package limit

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestAdmitWhatFits pins the admission rule: a request is admitted while
// settled usage plus the reservations already in flight is below Block,
// whatever its own estimate; it then reserves the estimate.
func TestAdmitWhatFits(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			for _, w := range []Window{Minute, Hour, Day, Month, Total} {
				t.Run(w.String(), func(t *testing.T) {
					b := newB(t)
					lim := []Limit{{Window: w, Block: 1000}}
					key := "tok:team:" + w.String()
					// The estimate alone (body/4 + 1024 output tokens) is
					// past the limit; actual usage is 150 a request.
					const est, actual = 1074, 150
					admitted := 0
					for i := range 10 {
						r, d, err := b.Reserve(ctx, key, est, lim, t0)
						if err != nil {
							t.Fatal(err)
						}
						if !d.Allowed {
							if i < 6 {
								t.Fatalf("request %d refused at %v used: %+v", i+1, d.Used, d)
							}
							if d.Used < 1000 {
								t.Fatalf("refused below the limit: %+v", d)
							}
							if d.Reserved != 0 {
								t.Fatalf("refusal reports %v reserved with nothing in flight", d.Reserved)
							}
							continue
						}
						admitted++
						if d.Reserved != est || d.Used != float64(admitted-1)*actual+est {
							t.Errorf("request %d: Used %v Reserved %v", i+1, d.Used, d.Reserved)
						}
						if err := b.Settle(ctx, r, actual, t0); err != nil {
							t.Fatal(err)
						}
					}
					// 6×150 = 900 < 1000 admits a 7th; 1050 refuses the rest.
					if admitted != 7 {
						t.Fatalf("admitted %d sequential requests, want 7", admitted)
					}
				})
			}
		})
	}
}

// TestAdmitInFlightCounts shows that reservations in flight count: a
// second request is refused while the first one's estimate fills the
// budget, and admitted once it settles below it.
func TestAdmitInFlightCounts(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			b := newB(t)
			lim := []Limit{{Window: Day, Block: 1000}}
			r, d, err := b.Reserve(ctx, "k", 1500, lim, t0)
			if err != nil || !d.Allowed {
				t.Fatalf("first: %+v %v", d, err)
			}
			_, d, _ = b.Reserve(ctx, "k", 10, lim, t0)
			if d.Allowed || d.Used != 1500 || d.Reserved != 1500 {
				t.Fatalf("second while first in flight: %+v", d)
			}
			b.Settle(ctx, r, 100, t0)
			if _, d, _ = b.Reserve(ctx, "k", 10, lim, t0); !d.Allowed {
				t.Fatalf("refused after settling below the limit: %+v", d)
			}
		})
	}
}

// TestConcurrentAdmissionBound: 500 concurrent requests against a block
// of 10 000 with estimate e and actual a. The admitted requests' total
// actual usage stays within the documented bound: Block + (the last
// admitted request's actual) + the sum over admitted requests of
// max(0, actual - estimate).
func TestConcurrentAdmissionBound(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) {
			for _, tc := range []struct {
				name        string
				est, actual float64
			}{
				{"estimate equals actual", 150, 150},
				{"estimate above actual", 1074, 150},
				{"estimate below actual", 100, 150},
			} {
				t.Run(tc.name, func(t *testing.T) {
					ctx := context.Background()
					b := newB(t)
					const block = 10000
					lim := []Limit{{Window: Day, Block: block}}
					var mu sync.Mutex
					admitted := 0
					var wg sync.WaitGroup
					start := make(chan struct{})
					for range 500 {
						wg.Go(func() {
							<-start
							r, d, err := b.Reserve(ctx, "burst", tc.est, lim, t0)
							if err != nil {
								t.Error(err)
								return
							}
							if !d.Allowed {
								return
							}
							mu.Lock()
							admitted++
							mu.Unlock()
							// Hold briefly so admissions overlap.
							time.Sleep(time.Millisecond)
							if err := b.Settle(ctx, r, tc.actual, t0); err != nil {
								t.Error(err)
							}
						})
					}
					close(start)
					wg.Wait()
					used, err := b.Usage(ctx, "burst", Day, t0)
					if err != nil {
						t.Fatal(err)
					}
					bound := block + tc.actual + float64(admitted)*max(0, tc.actual-tc.est)
					if used > bound {
						t.Fatalf("%d admitted, %v used > bound %v", admitted, used, bound)
					}
					if tc.est <= tc.actual && used < block {
						t.Fatalf("%d admitted, %v used: the budget was not filled", admitted, used)
					}
					if tc.est == tc.actual && admitted != 67 { // ceil(10000/150)
						t.Fatalf("admitted %d, want exactly 67", admitted)
					}
					t.Logf("admitted %d, used %v of %v (bound %v)", admitted, used, float64(block), bound)
				})
			}
		})
	}
}

// TestReserveAll: a request is admitted on several counters at once, all
// or none, under the same rule as Reserve.
func TestReserveAll(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			b := newB(t)
			team := []Limit{{Window: Day, Block: 1000}}
			tok := []Limit{{Window: Hour, Warn: 100, Block: 5000}}
			cost := []Limit{{Window: Month, Block: 1}}
			charges := []Charge{{"tok:token:a", 1074, tok}, {"tok:team:a", 1074, team}, {"usd:team:a", 0.01, cost}, {"tok:service:s", 1074, nil}}
			res := make([]Reservation, len(charges))
			ds := make([]Decision, len(charges))
			admitted := 0
			for range 10 {
				which, err := b.ReserveAll(ctx, charges, res, ds, t0)
				if err != nil {
					t.Fatal(err)
				}
				if which >= 0 {
					if which != 1 || ds[1].Allowed || ds[1].Used != 1050 || ds[1].Reserved != 0 || ds[1].Limit != team[0] {
						t.Fatalf("refusal: which %d, %+v", which, ds[which])
					}
					break
				}
				admitted++
				if !ds[0].Warn || ds[1].Reserved != 1074 {
					t.Fatalf("decisions %+v", ds)
				}
				for i, r := range res[:len(charges)] {
					actual := 150.0
					if i == 2 {
						actual = 0.001
					}
					if err := b.Settle(ctx, r, actual, t0); err != nil {
						t.Fatal(err)
					}
				}
			}
			if admitted != 7 {
				t.Fatalf("admitted %d, want 7", admitted)
			}
			// The refusal held nothing on the other counters.
			if _, d, _ := b.Reserve(ctx, "tok:token:a", 0, []Limit{{Window: Hour, Block: 1050.5}}, t0); !d.Allowed || d.Reserved != 0 {
				t.Fatalf("a refused ReserveAll left a reservation: %+v", d)
			}
			if u, _ := b.Usage(ctx, "tok:service:s", Day, t0); u != 1050 {
				t.Fatalf("unlimited charge usage %v", u)
			}
		})
	}
}

// TestReserveAllConcurrent: 500 concurrent requests on a token and a team
// counter; the team's budget bounds both.
func TestReserveAllConcurrent(t *testing.T) {
	for name, newB := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			b := newB(t)
			const block = 10000
			var mu sync.Mutex
			admitted := 0
			var wg sync.WaitGroup
			for i := range 500 {
				wg.Go(func() {
					charges := []Charge{{fmt.Sprintf("tok:token:%d", i%7), 150, []Limit{{Window: Day, Block: 1e9}}}, {"tok:team:burst", 150, []Limit{{Window: Day, Block: block}}}}
					res := make([]Reservation, 2)
					ds := make([]Decision, 2)
					which, err := b.ReserveAll(ctx, charges, res, ds, t0)
					if err != nil || which >= 0 {
						return
					}
					mu.Lock()
					admitted++
					mu.Unlock()
					time.Sleep(time.Millisecond)
					for _, r := range res {
						b.Settle(ctx, r, 150, t0)
					}
				})
			}
			wg.Wait()
			if admitted != 67 {
				t.Fatalf("admitted %d, want 67 (ceil(10000/150))", admitted)
			}
			if u, _ := b.Usage(ctx, "tok:team:burst", Day, t0); u != 67*150 {
				t.Fatalf("team usage %v", u)
			}
		})
	}
}
