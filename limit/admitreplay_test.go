package limit

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"
)

// TestRedisBatchDecisionsEqualLocal pins the batch replay: a batch of
// requests admitted by one reserveBatchScript run gets, request by
// request, the decisions [Local] gives the same requests in the same order
// (admitted or the same refusing charge; the same Limit, Used, Reserved,
// Warn; Retry-After within the millisecond Redis rounds to), on counters
// with settled usage in the sliding minute, the hour and the total,
// warnings, warn-only windows and zero amounts.
func TestRedisBatchDecisionsEqualLocal(t *testing.T) {
	url := os.Getenv("KEYPOOL_TEST_REDIS")
	if url == "" {
		t.Skip("KEYPOOL_TEST_REDIS not set")
	}
	r := newTestRedis(t, url, RedisConfig{})
	l, err := NewLocal(LocalConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	now := t0.Add(30*time.Minute + 250*time.Millisecond)
	for _, add := range []struct {
		key    string
		amount float64
		ago    time.Duration
	}{
		{"a", 30, 50 * time.Second}, {"a", 20, 20 * time.Second}, {"a", 4, 5 * time.Second},
		{"a", 100, 20 * time.Minute}, {"b", 2.1, time.Hour}, {"c", 0.7, 10 * time.Minute},
	} {
		for name, b := range map[string]Counter{"local": l, "redis": r} {
			if err := b.Add(ctx, add.key, add.amount, now.Add(-add.ago)); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	aLims := []Limit{{Window: Minute, Warn: 70, Block: 100}, {Window: Hour, Block: 300}}
	bLims := []Limit{{Window: Total, Warn: 4, Block: 6}, {Window: Day, Block: 1e6}}
	cLims := []Limit{{Window: Day, Warn: 1}}
	tpm := []Limit{{Window: Minute, Block: 80}}
	var reqs [][]Charge
	for i := range 24 {
		switch i % 3 {
		case 0:
			reqs = append(reqs, []Charge{{"a", 7, aLims}, {"b", 0.3, bLims}, {"c", 0.1, cLims}})
		case 1:
			reqs = append(reqs, []Charge{{"t", 0, tpm}, {"b", 0.45, bLims}})
		default:
			reqs = append(reqs, []Charge{{"b", 0.2, bLims}, {"a", 3, aLims}, {"t", 0, tpm}})
		}
	}
	batch := make([]*admitCall, len(reqs))
	for i, cs := range reqs {
		batch[i] = r.newAdmitCall(cs, now)
	}
	r.admitBatch(batch)
	refusals := map[string]int{} // by the refusing window; "admitted"
	for i, cs := range reqs {
		c := batch[i]
		<-c.done
		if c.err != nil {
			t.Fatalf("request %d: %v", i, c.err)
		}
		ds := make([]Decision, len(cs))
		if _, err := c.decide(ds, false); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		lres, lds := make([]Reservation, len(cs)), make([]Decision, len(cs))
		which, err := l.ReserveAll(ctx, cs, lres, lds, now)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.which - 1; got != which {
			t.Fatalf("request %d: Redis which %d, Local %d (%+v)", i, got, which, lds)
		}
		if which < 0 {
			refusals["admitted"]++
		} else {
			refusals[lds[which].Limit.Window.String()]++
		}
		n := len(cs)
		if which >= 0 {
			n = which + 1
		}
		for j := range n {
			got, want := ds[j], lds[j]
			if d := got.RetryAfter - want.RetryAfter; d <= -time.Millisecond || d >= time.Millisecond {
				t.Errorf("request %d charge %d: RetryAfter %v, Local %v", i, j, got.RetryAfter, want.RetryAfter)
			}
			got.RetryAfter, want.RetryAfter = 0, 0
			if got != want {
				t.Errorf("request %d charge %d:\n redis %+v\n local %+v", i, j, got, want)
			}
		}
	}
	// The sequence must exercise admissions and refusals by a minute and
	// a total limit.
	if refusals["admitted"] == 0 || refusals[Minute.String()] == 0 || refusals[Total.String()] == 0 {
		t.Errorf("refusals by charge index %v: the sequence does not exercise the rule", refusals)
	}
	t.Log(fmt.Sprint("admitted, and refusals by window: ", refusals))
}

// TestRedisBatchAtTheFloatEdgeEqualsLocal pins the batch script's bar
// and guard (see reserveBatchScript) where the rule's float sum rounds: a
// batch of requests whose reservations sum up to a block with rounding
// (0.1s on 0.3 under 1, a total in the 1e16s where a unit is below half
// an ulp) admits exactly the requests [Local] admits, in the same order.
func TestRedisBatchAtTheFloatEdgeEqualsLocal(t *testing.T) {
	url := os.Getenv("KEYPOOL_TEST_REDIS")
	if url == "" {
		t.Skip("KEYPOOL_TEST_REDIS not set")
	}
	for _, tc := range []struct {
		name                   string
		settled, amount, block float64
	}{
		{"tenths", 0.3, 0.1, 1},
		{"tenths from 0.7", 0.7, 0.1, 1},
		{"cents", 0.07, 0.01, 0.3},
		{"units at 1e16", 1e16, 1, 1e16 + 6},
		{"thirds", 0, 1.0 / 3, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newTestRedis(t, url, RedisConfig{})
			l, err := NewLocal(LocalConfig{})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			now := t0.Add(time.Minute)
			for _, b := range []Counter{l, r} {
				if err := b.Add(ctx, "f", tc.settled, now); err != nil {
					t.Fatal(err)
				}
			}
			lims := []Limit{{Window: Total, Block: tc.block}, {Window: Day, Block: 1e18}}
			batch := make([]*admitCall, 40)
			for i := range batch {
				batch[i] = r.newAdmitCall([]Charge{{"f", tc.amount, lims}}, now)
			}
			r.admitBatch(batch)
			admitted := 0
			for i, c := range batch {
				<-c.done
				if c.err != nil {
					t.Fatal(c.err)
				}
				ds := make([]Decision, 1)
				if _, err := c.decide(ds, false); err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				res, lds := make([]Reservation, 1), make([]Decision, 1)
				which, err := l.ReserveAll(ctx, []Charge{{"f", tc.amount, lims}}, res, lds, now)
				if err != nil {
					t.Fatal(err)
				}
				if got := c.which - 1; got != which {
					t.Fatalf("request %d: Redis which %d, Local %d", i, got, which)
				}
				if which < 0 {
					admitted++
				}
			}
			if admitted == 0 || admitted == len(batch) {
				t.Errorf("%d of %d admitted: the case does not reach the block", admitted, len(batch))
			}
			t.Logf("%d admitted", admitted)
		})
	}
}
