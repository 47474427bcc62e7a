package keypool

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/breaker"
	"github.com/keypool/keypool/internal/testutil"
)

// clock is a fake clock for tests; it never sleeps.
type clock = testutil.Clock

func newClock() *clock { return testutil.NewClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)) }

func keysN(n int) []Key {
	ks := make([]Key, n)
	for i := range ks {
		ks[i] = Key{ID: fmt.Sprintf("k%d", i), Secret: Secret(fmt.Sprintf("sk-secret-%04d", i))}
	}
	return ks
}

func newTestPool(t *testing.T, clk *clock, svc Service, keys []Key, events *[]Event) *Pool {
	t.Helper()
	var mu sync.Mutex
	cfg := Config{Now: clk.Now, Breaker: breaker.Settings{ConsecutiveFailures: 2, OpenTimeout: 30 * time.Second, HalfOpenMaxRequests: 1}}
	if events != nil {
		cfg.OnEvent = func(e Event) { mu.Lock(); *events = append(*events, e); mu.Unlock() }
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if svc.Name == "" {
		svc.Name = "svc"
	}
	if err := p.SetService(svc, keys); err != nil {
		t.Fatal(err)
	}
	return p
}

func acquire(t *testing.T, p *Pool, r Request) Lease {
	t.Helper()
	l, err := p.Acquire("svc", r)
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	return l
}

func counts(t *testing.T, p *Pool, n int, r Request) map[string]int {
	t.Helper()
	got := map[string]int{}
	for i := 0; i < n; i++ {
		l := acquire(t, p, r)
		got[l.KeyID()]++
		l.Release(Outcome{})
	}
	return got
}

func TestKeyLifecycle(t *testing.T) {
	clk := newClock()
	var events []Event
	p := newTestPool(t, clk, Service{}, keysN(2), &events)

	// 429 with Retry-After: out until then, back after.
	l := acquire(t, p, Request{Exclude: []string{"k1"}})
	l.Release(Outcome{Kind: RateLimited, RetryAfter: 30 * time.Second})
	for i := 0; i < 10; i++ {
		if l := acquire(t, p, Request{}); l.KeyID() != "k1" {
			t.Fatalf("cooling key k0 picked")
		} else {
			l.Release(Outcome{})
		}
	}
	st, _ := p.Stats("svc")
	if st[0].State != StateCooling || st[0].Until.Before(clk.Now().Add(30*time.Second)) {
		t.Fatalf("k0 stats = %+v, want cooling ≥ 30s", st[0])
	}
	clk.Advance(29 * time.Second)
	if got := counts(t, p, 10, Request{}); got["k0"] != 0 {
		t.Fatal("k0 back before its Retry-After")
	}
	clk.Advance(5 * time.Second)
	if got := counts(t, p, 10, Request{}); got["k0"] == 0 {
		t.Fatal("k0 not back after its Retry-After")
	}

	// 401: never again until an admin says so.
	l = acquire(t, p, Request{Exclude: []string{"k1"}})
	l.Release(Outcome{Kind: Invalid})
	clk.Advance(24 * time.Hour)
	if got := counts(t, p, 10, Request{}); got["k0"] != 0 {
		t.Fatal("invalid key picked")
	}
	p.SetKeyState("svc", "k0", StateActive, time.Time{}, "")
	if got := counts(t, p, 10, Request{}); got["k0"] == 0 {
		t.Fatal("re-activated key not picked")
	}

	// Failures trip the breaker (2 in a row), half-open admits one probe.
	for i := 0; i < 2; i++ {
		l = acquire(t, p, Request{Exclude: []string{"k1"}})
		l.Release(Outcome{Kind: Failure})
	}
	st, _ = p.Stats("svc")
	if st[0].State != StateOpen {
		t.Fatalf("k0 state %v after 2 failures, want open", st[0].State)
	}
	clk.Advance(31 * time.Second)
	probe := acquire(t, p, Request{Exclude: []string{"k1"}})
	if probe.KeyID() != "k0" {
		t.Fatal("no probe on k0")
	}
	if _, err := p.Acquire("svc", Request{Exclude: []string{"k1"}}); !errors.Is(err, ErrNoKeyAvailable) {
		t.Fatalf("second probe admitted while half-open (max 1): %v", err)
	}
	probe.Release(Outcome{})
	st, _ = p.Stats("svc")
	if st[0].State != StateActive || st[0].Breaker != "closed" {
		t.Fatalf("after a good probe: %v/%s", st[0].State, st[0].Breaker)
	}

	// Exhausted with a reset time comes back; without one it stays out.
	l = acquire(t, p, Request{Exclude: []string{"k1"}})
	l.Release(Outcome{Kind: Exhausted, RetryAfter: time.Hour})
	clk.Advance(time.Hour + time.Second)
	if got := counts(t, p, 10, Request{}); got["k0"] == 0 {
		t.Fatal("exhausted key not back after its reset")
	}

	// Client errors and cancellations do not touch the key.
	for i := 0; i < 10; i++ {
		l = acquire(t, p, Request{Exclude: []string{"k1"}})
		l.Release(Outcome{Kind: ClientError})
		l = acquire(t, p, Request{Exclude: []string{"k1"}})
		l.Release(Outcome{Kind: Canceled})
	}
	if st, _ = p.Stats("svc"); st[0].State != StateActive {
		t.Fatalf("client errors moved k0 to %v", st[0].State)
	}

	// A key back from a cooldown or a quota reset probes first (half-open).
	wantSeq := []State{StateCooling, StateHalfOpen, StateActive, StateInvalid, StateActive, StateOpen, StateHalfOpen, StateActive, StateExhausted, StateHalfOpen, StateActive}
	var seq []State
	for _, e := range events {
		if e.KeyID == "k0" {
			seq = append(seq, e.State)
		}
	}
	if fmt.Sprint(seq) != fmt.Sprint(wantSeq) {
		t.Fatalf("events %v, want %v", seq, wantSeq)
	}
}

func TestNoKeyErrorSaysWhen(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(2), nil)
	for _, ra := range []time.Duration{40 * time.Second, 20 * time.Second} {
		l := acquire(t, p, Request{})
		l.Release(Outcome{Kind: RateLimited, RetryAfter: ra})
	}
	_, err := p.Acquire("svc", Request{})
	var nk *NoKeyError
	if !errors.As(err, &nk) || !errors.Is(err, ErrNoKeyAvailable) {
		t.Fatalf("err = %v, want *NoKeyError", err)
	}
	if nk.RetryAfter < 20*time.Second || nk.RetryAfter > 23*time.Second {
		t.Fatalf("RetryAfter = %v, want ≈20s (the first key back)", nk.RetryAfter)
	}
	if nk.Reason != "2 keys: 2 cooling" || !strings.Contains(err.Error(), "2 cooling") {
		t.Fatalf("Reason = %q, error %q", nk.Reason, err)
	}
	_ = p.SetService(Service{Name: "empty"}, nil)
	if _, err := p.Acquire("empty", Request{}); !errors.As(err, &nk) || nk.Reason != "the service has no keys" {
		t.Fatalf("empty service: %v", err)
	}
	if _, err := p.Acquire("nope", Request{}); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("unknown service: %v", err)
	}
}

func TestBackoffWithoutRetryAfter(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	var last time.Duration
	for i := 1; i <= 12; i++ {
		l := acquire(t, p, Request{})
		l.Release(Outcome{Kind: RateLimited, RetryAfter: -time.Second}) // bad value → backoff
		st, _ := p.Stats("svc")
		d := st[0].Until.Sub(clk.Now())
		if d > 5*time.Minute+time.Minute {
			t.Fatalf("attempt %d: cooldown %v exceeds the cap", i, d)
		}
		if i > 1 && i < 8 && d < last {
			t.Fatalf("attempt %d: backoff shrank %v → %v", i, last, d)
		}
		last = d
		clk.Advance(d + time.Millisecond)
	}
	// A huge Retry-After is clamped to the cap (1 h by default), not
	// discarded.
	l := acquire(t, p, Request{})
	l.Release(Outcome{Kind: RateLimited, RetryAfter: 1000 * time.Hour})
	st, _ := p.Stats("svc")
	if d := st[0].Until.Sub(clk.Now()); d != time.Hour {
		t.Fatalf("huge Retry-After: cooldown %v, want the 1h cap", d)
	}
}

// TestKeyOverItsRPMIsPassedOverUntilItsNextToken: a key at its rpm burst
// is skipped while another has room, takes one request a second as its
// bucket refills, and alone makes NoKeyError say retry in about a second.
func TestKeyOverItsRPMIsPassedOverUntilItsNextToken(t *testing.T) {
	clk := newClock()
	keys := keysN(2)
	keys[1].RateLimitRPM = -1 // unlimited
	p := newTestPool(t, clk, Service{RateLimitRPM: 60, RateBurst: 2}, keys, nil)
	got := counts(t, p, 20, Request{})
	if got["k0"] != 2 || got["k1"] != 18 {
		t.Fatalf("with k0 at burst 2: %v", got)
	}
	clk.Advance(time.Second)
	got = counts(t, p, 10, Request{})
	if got["k0"] != 1 {
		t.Fatalf("k0 after one second (1 rps): %v", got)
	}
	// Only the limited key: no key → retry after about a second.
	p2 := newTestPool(t, clk, Service{RateLimitRPM: 60, RateBurst: 1}, keysN(1), nil)
	counts(t, p2, 1, Request{})
	_, err := p2.Acquire("svc", Request{})
	var nk *NoKeyError
	if !errors.As(err, &nk) || nk.RetryAfter > 2*time.Second {
		t.Fatalf("err %v", err)
	}
}

// TestKeyAtMaxInFlightIsPassedOverUntilARequestEnds: no key is leased
// beyond its in-flight cap; the slot a release frees is taken by the next
// request.
func TestKeyAtMaxInFlightIsPassedOverUntilARequestEnds(t *testing.T) {
	p := newTestPool(t, newClock(), Service{MaxInFlight: 2}, keysN(2), nil)
	var ls []Lease
	for i := 0; i < 4; i++ {
		ls = append(ls, acquire(t, p, Request{}))
	}
	if _, err := p.Acquire("svc", Request{}); !errors.Is(err, ErrNoKeyAvailable) {
		t.Fatalf("fifth request admitted over max in flight: %v", err)
	}
	ls[0].Release(Outcome{})
	l := acquire(t, p, Request{})
	if l.KeyID() != ls[0].KeyID() {
		t.Fatalf("freed slot on %s, picked %s", ls[0].KeyID(), l.KeyID())
	}
}

// TestFeatureRequestsGoOnlyToKeysServingTheFeature: a request for a
// feature gets a key labelled with it or listing it, within that key's
// feature rpm, and no key for a feature none serves.
func TestFeatureRequestsGoOnlyToKeysServingTheFeature(t *testing.T) {
	keys := keysN(3)
	keys[0].Labels = map[string]string{"feature": "image-gen"}
	keys[1].Features = map[string]int{"image-gen": 10, "chat": 0}
	p := newTestPool(t, newClock(), Service{}, keys, nil)
	got := counts(t, p, 30, Request{Feature: "image-gen"})
	if got["k2"] != 0 || got["k0"] == 0 {
		t.Fatalf("feature picks %v", got)
	}
	if got["k1"] > 10 || got["k1"] == 0 {
		t.Fatalf("k1's image-gen rate (10/min, burst 10) exceeded or unused: %v", got)
	}
	if _, err := p.Acquire("svc", Request{Feature: "video"}); !errors.Is(err, ErrNoKeyAvailable) {
		t.Fatalf("unknown feature: %v", err)
	}
}

func TestReloadKeepsLiveState(t *testing.T) {
	clk := newClock()
	keys := keysN(3)
	p := newTestPool(t, clk, Service{}, keys, nil)
	l := acquire(t, p, Request{Exclude: []string{"k1", "k2"}})
	l.Release(Outcome{Kind: RateLimited, RetryAfter: time.Minute})
	inflight := acquire(t, p, Request{Exclude: []string{"k0", "k2"}}) // k1
	removed := acquire(t, p, Request{Exclude: []string{"k0", "k1"}})  // k2

	// Reload: k0 unchanged (weight edit), k1 unchanged, k2 removed, k3 new.
	next := []Key{keys[0], keys[1], {ID: "k3", Secret: "sk-new-key-0003"}}
	next[0].Weight = 5
	if err := p.SetService(Service{Name: "svc"}, next); err != nil {
		t.Fatal(err)
	}
	st, _ := p.Stats("svc")
	byID := map[string]KeyStats{}
	for _, s := range st {
		byID[s.ID] = s
	}
	if byID["k0"].State != StateCooling {
		t.Fatalf("reload reset k0's cooldown: %v", byID["k0"].State)
	}
	if byID["k1"].InFlight != 1 {
		t.Fatalf("reload lost k1's in-flight count: %d", byID["k1"].InFlight)
	}
	if _, ok := byID["k2"]; ok {
		t.Fatal("removed key still listed")
	}
	got := counts(t, p, 20, Request{})
	if got["k2"] != 0 || got["k0"] != 0 || got["k3"] == 0 {
		t.Fatalf("after reload: %v", got)
	}
	// A late release of the removed key is ignored; in-flight releases fine.
	removed.Release(Outcome{Kind: Invalid})
	removed.Release(Outcome{Kind: Invalid}) // idempotent
	inflight.Release(Outcome{})
	if st, _ := p.Stats("svc"); st[1].InFlight != 0 {
		t.Fatalf("k1 in flight %d after release", st[1].InFlight)
	}
	// Changing a key's secret starts it fresh, and a stale lease is ignored.
	l = acquire(t, p, Request{Exclude: []string{"k0", "k3"}}) // k1
	next[1].Secret = "sk-rotated-0001"
	_ = p.SetService(Service{Name: "svc"}, next)
	l.Release(Outcome{Kind: Invalid})
	if st, _ := p.Stats("svc"); st[1].State != StateActive {
		t.Fatalf("stale report applied to rotated key: %v", st[1].State)
	}
	// A stored state change (an admin in another replica) is applied.
	next[1].State, next[1].Reason = StateDisabled, "admin"
	_ = p.SetService(Service{Name: "svc"}, next)
	if got := counts(t, p, 10, Request{}); got["k1"] != 0 {
		t.Fatal("disabled key picked")
	}
	p.RemoveService("svc")
	if _, err := p.Acquire("svc", Request{}); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("removed service: %v", err)
	}
}

// TestSpendingAKeysBalanceExhaustsIt: costs reported on release or later
// through Spend exhaust a key once its balance is spent.
func TestSpendingAKeysBalanceExhaustsIt(t *testing.T) {
	keys := keysN(2)
	keys[0].BalanceTotal = 1.0
	p := newTestPool(t, newClock(), Service{}, keys, nil)
	for i := 0; i < 4; i++ {
		l := acquire(t, p, Request{Exclude: []string{"k1"}})
		l.Release(Outcome{Cost: 0.3})
	}
	st, _ := p.Stats("svc")
	if st[0].State != StateExhausted || st[0].Spent < 1.19 {
		t.Fatalf("after spending 1.2 of 1.0: %+v", st[0])
	}
	// Spend reported after the lease (metered at the end of a stream).
	keys[1].BalanceTotal = 0.5
	_ = p.SetService(Service{Name: "svc"}, keys)
	if !p.Spend("svc", "k1", 0.6) || p.Spend("svc", "nope", 1) {
		t.Fatal("Spend did not find its key")
	}
	if st, _ := p.Stats("svc"); st[1].State != StateExhausted || st[1].Remaining > -0.09 {
		t.Fatalf("after Spend: %+v", st[1])
	}
}

// TestAppliedEventRoutesAroundKeyAndIsEmittedAsRemote: another pool's
// cooldown applied here keeps the key out until it ends, and the change is
// emitted once, marked Remote.
func TestAppliedEventRoutesAroundKeyAndIsEmittedAsRemote(t *testing.T) {
	clk := newClock()
	var events, applied []Event
	a := newTestPool(t, clk, Service{}, keysN(2), &events)
	b := newTestPool(t, clk, Service{}, keysN(2), &applied)
	l := acquire(t, a, Request{Exclude: []string{"k1"}})
	l.Release(Outcome{Kind: RateLimited, RetryAfter: time.Minute})
	if len(events) != 1 || events[0].Remote {
		t.Fatalf("a's own events: %+v, want one, not remote", events)
	}
	for _, e := range events {
		if !b.Apply(e) {
			t.Fatalf("Apply did not find %s", e.KeyID)
		}
	}
	if len(applied) != 1 || !applied[0].Remote || applied[0].State != StateCooling || !applied[0].Until.Equal(events[0].Until) {
		t.Fatalf("b's events after Apply: %+v, want the cooldown, remote", applied)
	}
	// The same event again changes nothing and emits nothing, so two
	// replicas that both listened could not echo it between them.
	b.Apply(events[0])
	if len(applied) != 1 {
		t.Fatalf("re-applying an event emitted %+v", applied[1:])
	}
	if b.Apply(Event{Service: "svc", KeyID: "nope", State: StateInvalid}) || b.Apply(Event{Service: "nope", KeyID: "k0"}) {
		t.Fatal("Apply reported an unknown key as found")
	}
	if got := counts(t, b, 10, Request{}); got["k0"] != 0 {
		t.Fatal("replica b picked k0 after applying its cooldown")
	}
	clk.Advance(2 * time.Minute)
	if got := counts(t, b, 10, Request{}); got["k0"] == 0 {
		t.Fatal("replica b did not re-admit k0")
	}
}

// TestConcurrentUseLeavesNothingInFlight: 8 goroutines leasing, releasing
// with every outcome, reading stats and reloading leave no request counted
// in flight.
func TestConcurrentUseLeavesNothingInFlight(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{MaxInFlight: 3}, keysN(8), nil)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			kinds := []OutcomeKind{OK, OK, OK, RateLimited, Failure, OK, ClientError}
			for i := 0; i < 2000; i++ {
				l, err := p.Acquire("svc", Request{})
				if err != nil {
					clk.Advance(time.Second)
					continue
				}
				l.Release(Outcome{Kind: kinds[(i+g)%len(kinds)], RetryAfter: time.Second})
				if i%100 == 0 {
					_, _ = p.Stats("svc")
				}
				if i%500 == 0 && g == 0 {
					_ = p.SetService(Service{Name: "svc", MaxInFlight: 3}, keysN(8))
				}
			}
		}(g)
	}
	wg.Wait()
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.InFlight != 0 {
			t.Fatalf("%s: %d in flight after all released", s.ID, s.InFlight)
		}
	}
}

// TestInvalidConfigIsRejected: a breaker without half-open probes, keys
// without or with duplicate ids and a service without a name are
// ErrInvalidConfig.
func TestInvalidConfigIsRejected(t *testing.T) {
	if _, err := New(Config{Breaker: breaker.Settings{ConsecutiveFailures: 3}}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("zero half-open probes accepted: %v", err)
	}
	p, _ := New(Config{})
	for name, keys := range map[string][]Key{
		"empty id":  {{Secret: "x"}},
		"duplicate": {{ID: "a", Secret: "x"}, {ID: "a", Secret: "y"}},
	} {
		if err := p.SetService(Service{Name: "s"}, keys); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := p.SetService(Service{}, nil); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("empty service name: %v", err)
	}
}

// TestIsolated429sDoNotEscalateBackoff: a 429 followed by successes starts
// the next cooldown's backoff from the first step again.
func TestIsolated429sDoNotEscalateBackoff(t *testing.T) {
	clk := newClock()
	var ns []int
	p, _ := New(Config{Now: clk.Now, Backoff: func(n int, max time.Duration) time.Duration {
		ns = append(ns, n)
		return time.Second
	}})
	_ = p.SetService(Service{Name: "svc"}, keysN(1))
	for i := 0; i < 4; i++ {
		l := acquire(t, p, Request{})
		l.Release(Outcome{Kind: RateLimited})
		clk.Advance(2 * time.Second)
		for j := 0; j < 5; j++ {
			l := acquire(t, p, Request{})
			l.Release(Outcome{})
		}
	}
	if fmt.Sprint(ns) != "[1 1 1 1]" {
		t.Fatalf("backoff attempts %v, want [1 1 1 1]", ns)
	}
}

// TestHalfOpenFromAnotherReplicaProbesWithFreshBreaker: a key another
// replica moved to half-open while this replica's breaker is still open
// takes its probe, and a good probe makes it active.
func TestHalfOpenFromAnotherReplicaProbesWithFreshBreaker(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	for i := 0; i < 2; i++ {
		l := acquire(t, p, Request{})
		l.Release(Outcome{Kind: Failure})
	}
	p.Apply(Event{Service: "svc", KeyID: "k0", State: StateHalfOpen})
	l := acquire(t, p, Request{})
	l.Release(Outcome{})
	if st, _ := p.Stats("svc"); st[0].State != StateActive {
		t.Fatalf("after a good probe: %v (breaker %s)", st[0].State, st[0].Breaker)
	}
}

// TestToppedUpKeyReturnsToRotation: a key exhausted by spend is active
// again once a reload raises its balance.
func TestToppedUpKeyReturnsToRotation(t *testing.T) {
	keys := keysN(1)
	keys[0].BalanceTotal = 1
	p := newTestPool(t, newClock(), Service{}, keys, nil)
	l := acquire(t, p, Request{})
	l.Release(Outcome{Cost: 1.5})
	keys[0].BalanceTotal = 100
	_ = p.SetService(Service{Name: "svc"}, keys)
	if st, _ := p.Stats("svc"); st[0].State != StateActive {
		t.Fatalf("topped-up key: %v", st[0].State)
	}
}

// TestKeysAtInFlightCapSayRetryInASecond: when every key is at its
// in-flight cap, NoKeyError says to retry in a second: a key is back as
// soon as a request ends.
func TestKeysAtInFlightCapSayRetryInASecond(t *testing.T) {
	p := newTestPool(t, newClock(), Service{MaxInFlight: 1}, keysN(1), nil)
	l := acquire(t, p, Request{})
	defer l.Release(Outcome{})
	_, err := p.Acquire("svc", Request{})
	var nk *NoKeyError
	if !errors.As(err, &nk) || nk.RetryAfter != time.Second {
		t.Fatalf("err %v", err)
	}
}

// TestRateBurstIsFullRPM: a key with rpm 100 gives 100 of 120 quick
// leases (keypooler's "100 calls in the minute"), then one more each
// 0.6 s; a feature's rpm likewise; RateBurst smooths when set.
func TestRateBurstIsFullRPM(t *testing.T) {
	clk := newClock()
	keys := keysN(1)
	keys[0].RateLimitRPM = 100
	p := newTestPool(t, clk, Service{}, keys, nil)
	if got := admitted(p, 120, Request{}); got != 100 {
		t.Fatalf("rpm 100: %d of 120 quick leases, want 100", got)
	}
	clk.Advance(6 * time.Second)
	if got := admitted(p, 20, Request{}); got != 10 {
		t.Fatalf("6 s later: %d, want 10", got)
	}

	fk := keysN(1)
	fk[0].Features = map[string]int{"image-generation": 50}
	pf := newTestPool(t, clk, Service{}, fk, nil)
	if got := admitted(pf, 60, Request{Feature: "image-generation"}); got != 50 {
		t.Fatalf("feature rpm 50: %d of 60, want 50", got)
	}
	if st, _ := pf.Stats("svc"); st[0].Features["image-generation"] != (FeatureUse{RPM: 50, Used: 50, Available: 0}) {
		t.Fatalf("stats after 50 leases: %+v, want rpm 50 used 50 available 0", st[0].Features)
	}
	clk.Advance(12 * time.Second)
	if st, _ := pf.Stats("svc"); st[0].Features["image-generation"] != (FeatureUse{RPM: 50, Used: 40, Available: 10}) {
		t.Fatalf("stats 12 s later: %+v, want rpm 50 used 40 available 10", st[0].Features)
	}

	sk := keysN(1)
	sk[0].RateLimitRPM = 100
	ps := newTestPool(t, clk, Service{RateBurst: 10}, sk, nil)
	if got := admitted(ps, 120, Request{}); got != 10 {
		t.Fatalf("RateBurst 10: %d of 120, want 10", got)
	}
}

// admitted tries n quick leases and returns how many were granted.
func admitted(p *Pool, n int, r Request) int {
	got := 0
	for range n {
		l, err := p.Acquire("svc", r)
		if err != nil {
			continue
		}
		got++
		l.Release(Outcome{})
	}
	return got
}
