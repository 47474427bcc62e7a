package keypool

import (
	"fmt"
	"hash/fnv"
	"math"
	"testing"
	"time"
)

// TestSelectorsSpreadPicksByTheirPolicy: round robin and weighted hold
// their shares within 2% over 100 000 picks; random covers every key.
func TestSelectorsSpreadPicksByTheirPolicy(t *testing.T) {
	const picks = 100000
	t.Run("round robin within 2%", func(t *testing.T) {
		p := newTestPool(t, newClock(), Service{}, keysN(7), nil)
		got := counts(t, p, picks, Request{})
		for id, n := range got {
			want := float64(picks) / 7
			if math.Abs(float64(n)-want)/want > 0.02 {
				t.Errorf("%s: %d picks, want %.0f ±2%%", id, n, want)
			}
		}
		if len(got) != 7 {
			t.Fatalf("picked %d keys, want 7", len(got))
		}
	})
	t.Run("weighted within 2% of weights", func(t *testing.T) {
		keys := keysN(4)
		weights := []int{1, 2, 3, 10}
		for i := range keys {
			keys[i].Weight = weights[i]
		}
		p := newTestPool(t, newClock(), Service{Selector: Weighted{}}, keys, nil)
		got := counts(t, p, picks, Request{})
		for i, k := range keys {
			want := float64(picks) * float64(weights[i]) / 16
			if math.Abs(float64(got[k.ID])-want)/want > 0.02 {
				t.Errorf("%s weight %d: %d picks, want %.0f ±2%%", k.ID, weights[i], got[k.ID], want)
			}
		}
	})
	t.Run("random covers all keys", func(t *testing.T) {
		p := newTestPool(t, newClock(), Service{Selector: Random{}}, keysN(5), nil)
		got := counts(t, p, 10000, Request{})
		for id, n := range got {
			if n < 1600 || n > 2400 {
				t.Errorf("%s: %d of 10000", id, n)
			}
		}
	})
}

// TestStickyKeepsAnAffinityOnOneKeyWhileItIsHealthy: an affinity stays
// on its key, moves while the key is out of rotation and comes back.
func TestStickyKeepsAnAffinityOnOneKeyWhileItIsHealthy(t *testing.T) {
	p := newTestPool(t, newClock(), Service{Selector: &Sticky{}}, keysN(10), nil)
	first := map[string]string{}
	for i := 0; i < 50; i++ {
		a := fmt.Sprintf("user-%d", i)
		l := acquire(t, p, Request{Affinity: a})
		first[a] = l.KeyID()
		l.Release(Outcome{})
	}
	spread := map[string]bool{}
	for a, id := range first {
		spread[id] = true
		for j := 0; j < 5; j++ {
			l := acquire(t, p, Request{Affinity: a})
			if l.KeyID() != id {
				t.Fatalf("affinity %s moved from %s to %s", a, id, l.KeyID())
			}
			l.Release(Outcome{})
		}
	}
	if len(spread) < 5 {
		t.Errorf("50 affinities landed on only %d keys", len(spread))
	}
	// When a key becomes unhealthy its clients move, and come back after.
	var a, id string
	for a, id = range first {
		break
	}
	l := acquire(t, p, Request{Affinity: a})
	l.Release(Outcome{Kind: Invalid})
	l2 := acquire(t, p, Request{Affinity: a})
	if l2.KeyID() == id {
		t.Fatal("sticky kept an invalid key")
	}
	l2.Release(Outcome{})
	p.SetKeyState("svc", id, StateActive, time.Time{}, "")
	l3 := acquire(t, p, Request{Affinity: a})
	if l3.KeyID() != id {
		t.Fatalf("affinity did not return to %s after recovery, got %s", id, l3.KeyID())
	}
	l3.Release(Outcome{})
}

// TestLeastInFlightPicksTheIdleKey: a key with requests in flight is
// passed over while an idle one is available.
func TestLeastInFlightPicksTheIdleKey(t *testing.T) {
	p := newTestPool(t, newClock(), Service{Selector: &LeastInFlight{}}, keysN(3), nil)
	busy := []Lease{acquire(t, p, Request{}), acquire(t, p, Request{})}
	l := acquire(t, p, Request{})
	for _, b := range busy {
		if b.KeyID() == l.KeyID() {
			t.Fatalf("picked busy key %s", l.KeyID())
		}
	}
	// Hold three on k-any; with two more busy the idle one must win.
	for i := 0; i < 10; i++ {
		n := acquire(t, p, Request{})
		if n.c.inFlight.Load() > 2 {
			t.Fatalf("least_in_flight picked a key with %d in flight", n.c.inFlight.Load())
		}
		n.Release(Outcome{})
	}
}

// TestLeastUsedPicksMostLeftAndOrderedLowestPriority: least_used takes
// the key with the most balance left; ordered the lowest priority, and
// the next one while it cools.
func TestLeastUsedPicksMostLeftAndOrderedLowestPriority(t *testing.T) {
	keys := keysN(3)
	keys[0].BalanceTotal, keys[0].BalanceUsed = 10, 9
	keys[1].BalanceTotal, keys[1].BalanceUsed = 10, 2
	keys[2].BalanceTotal, keys[2].BalanceUsed = 10, 5
	p := newTestPool(t, newClock(), Service{Selector: &LeastUsed{}}, keys, nil)
	if l := acquire(t, p, Request{}); l.KeyID() != "k1" {
		t.Fatalf("least_used picked %s, want k1 (most left)", l.KeyID())
	}
	keys = keysN(3)
	keys[0].Priority, keys[1].Priority, keys[2].Priority = 2, 0, 1
	p = newTestPool(t, newClock(), Service{Selector: &Ordered{}}, keys, nil)
	l := acquire(t, p, Request{})
	if l.KeyID() != "k1" {
		t.Fatalf("ordered picked %s, want k1", l.KeyID())
	}
	l.Release(Outcome{Kind: RateLimited, RetryAfter: time.Minute})
	if l := acquire(t, p, Request{}); l.KeyID() != "k2" {
		t.Fatalf("ordered fallback picked %s, want k2", l.KeyID())
	}
}

// TestLatencySelectorPrefersTheFasterKey: with one key 50 times slower,
// the latency selector sends at least 70% of picks to the fast one.
func TestLatencySelectorPrefersTheFasterKey(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{Selector: Latency{}}, keysN(2), nil)
	// Teach it: k0 slow, k1 fast.
	for i := 0; i < 20; i++ {
		l := acquire(t, p, Request{})
		if l.KeyID() == "k0" {
			clk.Advance(500 * time.Millisecond)
		} else {
			clk.Advance(10 * time.Millisecond)
		}
		l.Release(Outcome{})
	}
	got := map[string]int{}
	for i := 0; i < 1000; i++ {
		l := acquire(t, p, Request{})
		got[l.KeyID()]++
		if l.KeyID() == "k0" {
			clk.Advance(500 * time.Millisecond)
		} else {
			clk.Advance(10 * time.Millisecond)
		}
		l.Release(Outcome{})
	}
	if got["k1"] < 700 {
		t.Fatalf("fast key got %d of 1000", got["k1"])
	}
}

// TestSelectorChoosingExcludedKeyIsOverruled: a selector that insists on a
// key the request excludes does not get it.
func TestSelectorChoosingExcludedKeyIsOverruled(t *testing.T) {
	var first *Candidate
	sel := SelectorFunc(func(c *Candidates) *Candidate {
		if first == nil {
			first = c.At(0)
		}
		return first
	})
	p := newTestPool(t, newClock(), Service{Selector: sel}, keysN(2), nil)
	l := acquire(t, p, Request{})
	ex := l.KeyID()
	l.Release(Outcome{})
	if l := acquire(t, p, Request{Exclude: []string{ex}}); l.KeyID() == ex {
		t.Fatal("excluded key picked")
	}
}

// TestCandidateShowsASelectorTheKeysSettingsAndLiveState: every accessor
// a selector has reads the key it stands for, as the pool sees it at the
// pick.
func TestCandidateShowsASelectorTheKeysSettingsAndLiveState(t *testing.T) {
	keys := keysN(2)
	keys[0].Weight, keys[0].Priority, keys[0].Labels = 3, 7, map[string]string{"tier": "free"}
	keys[0].RateLimitRPM, keys[0].BalanceTotal = 60, 10
	type seen struct {
		id, tier            string
		hash                uint64
		weight, priority    int
		inFlight            int64
		failures            uint64
		remaining, rateLeft float64
		state               State
	}
	var last map[string]seen
	sel := SelectorFunc(func(c *Candidates) *Candidate {
		last = map[string]seen{}
		for i := 0; i < c.Len(); i++ {
			k := c.At(i)
			last[k.ID()] = seen{k.ID(), k.Label("tier"), k.IDHash(), k.Weight(), k.Priority(), k.InFlight(), k.Failures(), k.Remaining(), k.RateLeft(), k.State()}
		}
		for i := 0; i < c.Len(); i++ {
			if c.At(i).ID() == "k0" {
				return c.At(i)
			}
		}
		return nil
	})
	p := newTestPool(t, newClock(), Service{Selector: sel}, keys, nil)
	held := acquire(t, p, Request{})
	l := acquire(t, p, Request{})
	l.Release(Outcome{Kind: Failure, Cost: 1})
	l = acquire(t, p, Request{})
	l.Release(Outcome{})

	h := fnv.New64a()
	h.Write([]byte("k0"))
	want := seen{id: "k0", tier: "free", hash: h.Sum64(), weight: 3, priority: 7, inFlight: 1, failures: 1, remaining: 9, rateLeft: 58, state: StateActive}
	if got := last["k0"]; got != want {
		t.Errorf("k0 at the third pick:\n got %+v\nwant %+v", got, want)
	}
	if got := last["k1"]; got.weight != 1 || got.tier != "" || !math.IsInf(got.remaining, 1) || !math.IsInf(got.rateLeft, 1) {
		t.Errorf("k1 (no weight, labels, balance or rpm): %+v, want weight 1, no tier, +Inf remaining and rate", got)
	}
	held.Release(Outcome{})
}

// TestScratchIsPerKeyAndSurvivesReloads: a selector's scratch word is one
// per key, kept between picks and across a reload, and zero for a key
// loaded with a new secret.
func TestScratchIsPerKeyAndSurvivesReloads(t *testing.T) {
	sel := SelectorFunc(func(c *Candidates) *Candidate {
		for i := 0; i < c.Len(); i++ {
			*c.At(i).Scratch() += int64(i + 1)
		}
		return c.At(0)
	})
	scratch := map[string]int64{}
	probe := SelectorFunc(func(c *Candidates) *Candidate {
		for i := 0; i < c.Len(); i++ {
			scratch[c.At(i).ID()] = *c.At(i).Scratch()
		}
		return c.At(0)
	})
	keys := keysN(1)
	p := newTestPool(t, newClock(), Service{Selector: sel}, keys, nil)
	counts(t, p, 5, Request{})
	_ = p.SetService(Service{Name: "svc", Selector: probe}, keys)
	counts(t, p, 1, Request{})
	if scratch["k0"] != 5 {
		t.Fatalf("scratch after 5 picks and a reload: %d, want 5", scratch["k0"])
	}
	keys[0].Secret = "sk-rotated-0000"
	_ = p.SetService(Service{Name: "svc", Selector: probe}, keys)
	counts(t, p, 1, Request{})
	if scratch["k0"] != 0 {
		t.Fatalf("scratch of a key with a new secret: %d, want 0", scratch["k0"])
	}
}

// TestSelectorReturningAForeignCandidateIsOverruled: a candidate the
// selector made up, or kept from another pool, is never leased; the pool
// picks one it offered.
func TestSelectorReturningAForeignCandidateIsOverruled(t *testing.T) {
	var other *Candidate
	keep := SelectorFunc(func(c *Candidates) *Candidate { other = c.At(0); return other })
	q := newTestPool(t, newClock(), Service{Selector: keep}, keysN(1), nil)
	counts(t, q, 1, Request{})

	for name, c := range map[string]*Candidate{"made up": {}, "another pool's": other} {
		sel := SelectorFunc(func(*Candidates) *Candidate { return c })
		p := newTestPool(t, newClock(), Service{Selector: sel}, keysN(2), nil)
		l := acquire(t, p, Request{})
		if l.c.svc != (*p.services.Load())["svc"] {
			t.Errorf("%s candidate: leased a key of another service", name)
		}
		l.Release(Outcome{})
	}
}
