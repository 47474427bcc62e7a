package breaker

import (
	"errors"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		s    Settings
		ok   bool
	}{
		{"defaults", DefaultSettings(), true},
		{"zero half-open probes", Settings{ConsecutiveFailures: 3, OpenTimeout: time.Second}, false},
		{"negative timeout", Settings{HalfOpenMaxRequests: 1, OpenTimeout: -time.Second}, false},
		{"negative max timeout", Settings{HalfOpenMaxRequests: 1, MaxOpenTimeout: -time.Second}, false},
		{"zero failures means default", Settings{HalfOpenMaxRequests: 1}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.s)
			if (err == nil) != tt.ok {
				t.Fatalf("New(%+v) err = %v, want ok=%v", tt.s, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidSettings) {
				t.Fatalf("err %v does not wrap ErrInvalidSettings", err)
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	b, err := New(Settings{ConsecutiveFailures: 3, OpenTimeout: 10 * time.Second, HalfOpenMaxRequests: 2})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)

	// Failures interrupted by a success do not trip.
	b.Failure(now)
	b.Failure(now)
	if st := b.Success(); st != Closed {
		t.Fatalf("after success: %v", st)
	}
	b.Failure(now)
	if st := b.Failure(now); st != Closed {
		t.Fatalf("two consecutive failures tripped: %v", st)
	}
	if st := b.Failure(now); st != Open {
		t.Fatalf("third consecutive failure: %v, want open", st)
	}
	if got, want := b.OpenUntil(), now.Add(10*time.Second); !got.Equal(want) {
		t.Fatalf("OpenUntil = %v, want %v", got, want)
	}
	// Late reports while open are ignored and do not extend the period.
	b.Failure(now.Add(5 * time.Second))
	b.Success()
	if got := b.OpenUntil(); !got.Equal(now.Add(10 * time.Second)) {
		t.Fatalf("late report moved OpenUntil to %v", got)
	}
	if b.Ready(now.Add(9 * time.Second)) {
		t.Fatal("ready before the open period ended")
	}
	if !b.Ready(now.Add(10 * time.Second)) {
		t.Fatal("not ready after the open period")
	}
	if st := b.State(); st != HalfOpen {
		t.Fatalf("state after period = %v, want half_open", st)
	}
	// A failing probe re-opens from the probe's time, for twice as long
	// (the second ejection in a row).
	t2 := now.Add(11 * time.Second)
	if st := b.Failure(t2); st != Open {
		t.Fatalf("failed probe: %v, want open", st)
	}
	if got := b.OpenUntil(); !got.Equal(t2.Add(20 * time.Second)) {
		t.Fatalf("re-open until %v, want %v", got, t2.Add(20*time.Second))
	}
	// Two successful probes close it.
	b.Ready(t2.Add(20 * time.Second))
	if st := b.Success(); st != HalfOpen {
		t.Fatalf("one probe: %v, want half_open", st)
	}
	if st := b.Success(); st != Closed {
		t.Fatalf("two probes: %v, want closed", st)
	}
}

// TestEjectionGrows pins Envoy's manners: the n-th consecutive ejection
// lasts base × n up to the cap, and a key healthy for longer than the cap
// starts over.
func TestEjectionGrows(t *testing.T) {
	b, _ := New(Settings{ConsecutiveFailures: 1, OpenTimeout: 30 * time.Second, MaxOpenTimeout: 100 * time.Second, HalfOpenMaxRequests: 1})
	now := time.Unix(1000, 0)
	for i, want := range []time.Duration{30, 60, 90, 100, 100} {
		if b.Failure(now) != Open {
			t.Fatalf("trip %d: not open", i+1)
		}
		if got := b.OpenUntil().Sub(now); got != want*time.Second {
			t.Fatalf("trip %d: open for %v, want %v", i+1, got, want*time.Second)
		}
		now = b.OpenUntil()
		if !b.Ready(now) {
			t.Fatalf("trip %d: not ready after its period", i+1)
		}
	}
	if b.Ejections() != 5 {
		t.Fatalf("Ejections = %d, want 5", b.Ejections())
	}
	// A probe succeeds; the key stays healthy past the cap.
	if b.Success() != Closed {
		t.Fatal("probe did not close")
	}
	now = now.Add(101 * time.Second)
	b.Failure(now)
	if got := b.OpenUntil().Sub(now); got != 30*time.Second {
		t.Fatalf("after a long healthy spell: open for %v, want 30s", got)
	}
}

func TestReset(t *testing.T) {
	b, _ := New(Settings{ConsecutiveFailures: 1, HalfOpenMaxRequests: 1})
	now := time.Unix(0, 0)
	if b.Failure(now) != Open {
		t.Fatal("did not trip")
	}
	b.Reset()
	if b.State() != Closed || !b.Ready(now) {
		t.Fatal("reset did not close")
	}
	if b.Failure(now) != Open {
		t.Fatal("did not trip again after reset")
	}
}

func BenchmarkSuccessClosed(b *testing.B) {
	br, _ := New(DefaultSettings())
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			br.Success()
		}
	})
}
