package keypool

import (
	"errors"
	"sync"
	"testing"
	"time"
)

func stateOf(t *testing.T, p *Pool, id string) KeyStats {
	t.Helper()
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.ID == id {
			return s
		}
	}
	t.Fatalf("no key %s", id)
	return KeyStats{}
}

// only returns a request excluding every key but id.
func only(id string, n int) Request {
	var ex []string
	for _, k := range keysN(n) {
		if k.ID != id {
			ex = append(ex, k.ID)
		}
	}
	return Request{Exclude: ex}
}

func TestRefusalsConfirmBeforeInvalid(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(5), nil)
	refuse := func() {
		l := acquire(t, p, only("k0", 5))
		l.Release(Outcome{Kind: Refused, Reason: "403 forbidden"})
	}
	refuse()
	refuse()
	if s := stateOf(t, p, "k0"); s.State != StateActive || s.Refusals != 2 {
		t.Fatalf("after 2 refusals: %v refusals=%d, want active with 2", s.State, s.Refusals)
	}
	// A success in between clears the suspicion.
	l := acquire(t, p, only("k0", 5))
	l.Release(Outcome{})
	refuse()
	refuse()
	if s := stateOf(t, p, "k0"); s.State != StateActive {
		t.Fatalf("refusals survived a success: %v", s.State)
	}
	refuse()
	if s := stateOf(t, p, "k0"); s.State != StateInvalid {
		t.Fatalf("after 3 refusals in a row: %v, want invalid", s.State)
	}
}

func TestRefusalFloor(t *testing.T) {
	clk := newClock()
	var mu sync.Mutex
	var holds []Hold
	p, _ := New(Config{Now: clk.Now, OnHold: func(h Hold) { mu.Lock(); holds = append(holds, h); mu.Unlock() }})
	// Default floor: half of 4 keys = 2 stay in rotation.
	if err := p.SetService(Service{Name: "svc", ConfirmRefusals: 1}, keysN(4)); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"k0", "k1", "k2", "k3"} {
		l := acquire(t, p, only(id, 4))
		l.Release(Outcome{Kind: Refused, Reason: "403 forbidden"})
	}
	invalid := 0
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.State == StateInvalid {
			invalid++
		}
	}
	if invalid != 2 {
		t.Fatalf("%d keys invalid, want 2 (the floor keeps 2 of 4)", invalid)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(holds) != 2 || holds[0].Kind != HoldFloor || holds[0].Service != "svc" {
		t.Fatalf("holds = %+v, want 2 floor holds", holds)
	}
}

func TestRetryAfterClampedNeverDiscarded(t *testing.T) {
	tests := []struct {
		name     string
		cap      time.Duration
		ra       time.Duration
		min, max time.Duration
	}{
		{"301 s honoured", 0, 301 * time.Second, 301 * time.Second, 332 * time.Second},
		{"3600 s honoured at the default cap", 0, time.Hour, time.Hour, time.Hour},
		{"86400 s clamped to the default 1 h", 0, 24 * time.Hour, time.Hour, time.Hour},
		{"3600 s clamped to a service cap", 10 * time.Minute, time.Hour, 10 * time.Minute, 10 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			p := newTestPool(t, clk, Service{RetryAfterCap: tt.cap}, keysN(1), nil)
			l := acquire(t, p, Request{})
			l.Release(Outcome{Kind: RateLimited, RetryAfter: tt.ra})
			d := stateOf(t, p, "k0").Until.Sub(clk.Now())
			if d < tt.min || d > tt.max {
				t.Fatalf("cooldown %v, want %v..%v", d, tt.min, tt.max)
			}
		})
	}
	// A quota reset is capped at MaxQuotaWait (24 h).
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	l := acquire(t, p, Request{})
	l.Release(Outcome{Kind: Exhausted, RetryAfter: 1000 * time.Hour})
	if d := stateOf(t, p, "k0").Until.Sub(clk.Now()); d != 24*time.Hour {
		t.Fatalf("exhausted for %v, want 24h", d)
	}
}

// TestLaterShorterRetryAfterKeepsTheCooldown: two 429s of one key that
// raced each other, the later announcing an earlier time, leave the key
// cooling until the later of the two times.
func TestLaterShorterRetryAfterKeepsTheCooldown(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	first, second := acquire(t, p, Request{}), acquire(t, p, Request{})
	first.Release(Outcome{Kind: RateLimited, RetryAfter: 10 * time.Second})
	second.Release(Outcome{Kind: RateLimited, RetryAfter: time.Second})
	if d := stateOf(t, p, "k0").Until.Sub(clk.Now()); d < 10*time.Second {
		t.Fatalf("cooling for %v after a 10 s and a later 1 s Retry-After, want at least 10 s", d)
	}
}

// TestOneProbeAfterCooldown: when a cooldown ends, one request reaches the
// key; the rest wait until it succeeds.
func TestOneProbeAfterCooldown(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	l := acquire(t, p, Request{})
	l.Release(Outcome{Kind: RateLimited, RetryAfter: 30 * time.Second})
	clk.Advance(time.Minute)
	probe := acquire(t, p, Request{})
	for range 32 {
		if _, err := p.Acquire("svc", Request{}); !errors.Is(err, ErrNoKeyAvailable) {
			t.Fatalf("a second request reached the key during its probe: %v", err)
		}
	}
	probe.Release(Outcome{})
	if s := stateOf(t, p, "k0"); s.State != StateActive {
		t.Fatalf("after a good probe: %v", s.State)
	}
	a, b := acquire(t, p, Request{}), acquire(t, p, Request{})
	a.Release(Outcome{})
	b.Release(Outcome{})
}

// TestEjectionCapAndOutage: at most half the keys are ejected; when the
// rest trip too, one probe at a time tests the upstream and other
// requests get a fast *UnavailableError.
func TestEjectionCapAndOutage(t *testing.T) {
	clk := newClock()
	var mu sync.Mutex
	var holds []Hold
	p, _ := New(Config{Now: clk.Now, OnHold: func(h Hold) { mu.Lock(); holds = append(holds, h); mu.Unlock() }})
	_ = p.SetService(Service{Name: "svc"}, keysN(4))
	// Every key fails 5 times in a row (the default breaker).
	for range 5 {
		for _, id := range []string{"k0", "k1", "k2", "k3"} {
			l := acquire(t, p, only(id, 4))
			l.Release(Outcome{Kind: Failure, Reason: "500"})
		}
	}
	open, held := 0, 0
	st, _ := p.Stats("svc")
	for _, s := range st {
		if s.State == StateOpen {
			open++
		}
		if s.Held {
			held++
		}
	}
	if open != 2 || held != 2 {
		t.Fatalf("open=%d held=%d, want 2 and 2 (50%% cap)", open, held)
	}
	probe := acquire(t, p, Request{})
	for range 10 {
		_, err := p.Acquire("svc", Request{})
		var ue *UnavailableError
		if !errors.As(err, &ue) || !errors.Is(err, ErrUpstreamUnavailable) || ue.RetryAfter < time.Second {
			t.Fatalf("during the probe: %v, want *UnavailableError", err)
		}
	}
	probe.Release(Outcome{Kind: Failure, Reason: "500"})
	// The next probe goes a second later.
	if _, err := p.Acquire("svc", Request{}); !errors.Is(err, ErrUpstreamUnavailable) {
		t.Fatalf("a probe right after a failed one: %v", err)
	}
	clk.Advance(time.Second)
	probe = acquire(t, p, Request{}) // probing continues
	probe.Release(Outcome{})         // the upstream is back
	l := acquire(t, p, Request{})
	l.Release(Outcome{})
	mu.Lock()
	defer mu.Unlock()
	if len(holds) != 2 || holds[0].Kind != HoldEjectionCap {
		t.Fatalf("holds = %+v", holds)
	}
}

// TestAllEjectedIsUnavailable: a service whose only key is ejected answers
// UnavailableError (503), not NoKeyError (429).
func TestAllEjectedIsUnavailable(t *testing.T) {
	clk := newClock()
	p := newTestPool(t, clk, Service{}, keysN(1), nil)
	for range 2 {
		l := acquire(t, p, Request{})
		l.Release(Outcome{Kind: Failure})
	}
	_, err := p.Acquire("svc", Request{})
	var ue *UnavailableError
	if !errors.As(err, &ue) || ue.RetryAfter < 29*time.Second {
		t.Fatalf("err = %v, want *UnavailableError with the open period", err)
	}
	// Back from the ejection it takes one probe; the requests that come
	// meanwhile are told the upstream is failing (503), not that the
	// keys are busy (429).
	clk.Advance(31 * time.Second)
	l := acquire(t, p, Request{})
	for range 31 {
		_, err := p.Acquire("svc", Request{})
		if !errors.As(err, &ue) || ue.RetryAfter < time.Second {
			t.Fatalf("during the probe after an ejection: %v, want *UnavailableError", err)
		}
	}
	// Its second ejection in a row lasts twice as long.
	l.Release(Outcome{Kind: Failure})
	if d := stateOf(t, p, "k0").Until.Sub(clk.Now()); d != time.Minute {
		t.Fatalf("second ejection: %v, want 1m", d)
	}
}

func TestInvalidServiceSettingsAreRejected(t *testing.T) {
	p, _ := New(Config{})
	for _, svc := range []Service{
		{Name: "a", RetryAfterCap: -1}, {Name: "a", ConfirmRefusals: -1},
		{Name: "a", MinActiveKeys: -1}, {Name: "a", MaxEjectionPercent: 101},
	} {
		if err := p.SetService(svc, nil); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("SetService(%+v) = %v, want ErrInvalidConfig", svc, err)
		}
	}
}
