package server

import (
	"log/slog"
	"testing"
	"time"

	"github.com/keypool/keypool"
)

// TestAppliedKeyEventsAreNeitherSharedNorPersisted: a key state change the
// pool applied from another replica (Pool.Apply, Event.Remote) is not
// published back to the replicas nor queued for the store, so it cannot
// echo between replicas; the same change decided here is both.
func TestAppliedKeyEventsAreNeitherSharedNorPersisted(t *testing.T) {
	s := &Server{
		log:    slog.New(slog.DiscardHandler),
		events: make(chan keypool.Event, 4),
	}
	pool, err := keypool.New(keypool.Config{OnEvent: s.onEvent})
	if err != nil {
		t.Fatal(err)
	}
	s.metrics = newMetrics(pool, func() float64 { return 0 })
	s.share = newSharer(nil, pool, s.log)
	if err := pool.SetService(keypool.Service{Name: "svc"}, []keypool.Key{{ID: "k1", Secret: "sk-1"}, {ID: "k2", Secret: "sk-2"}}); err != nil {
		t.Fatal(err)
	}

	if !pool.Apply(keypool.Event{Service: "svc", KeyID: "k1", State: keypool.StateInvalid, Reason: "401 on replica b", At: time.Now()}) {
		t.Fatal("Apply did not find k1")
	}
	if st, _ := pool.Stats("svc"); st[0].State != keypool.StateInvalid {
		t.Fatalf("k1 after Apply: %v, want invalid", st[0].State)
	}
	if len(s.share.out) != 0 || len(s.events) != 0 {
		t.Fatalf("an applied event was queued: %d to share, %d to persist", len(s.share.out), len(s.events))
	}

	pool.SetKeyState("svc", "k2", keypool.StateInvalid, time.Time{}, "401 here")
	if len(s.share.out) != 1 || len(s.events) != 1 {
		t.Fatalf("a change made here: %d to share, %d to persist, want 1 and 1", len(s.share.out), len(s.events))
	}
}
