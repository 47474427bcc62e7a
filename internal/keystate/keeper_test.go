package keystate

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
)

// fakeStore records SetKeyStatus calls.
type fakeStore struct {
	mu  sync.Mutex
	set []string // "id status reason"
}

func (f *fakeStore) SetKeyStatus(_ context.Context, id, status, reason string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = append(f.set, id+" "+status+" "+reason)
	return nil
}

func (f *fakeStore) calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.set...)
}

// newTestKeeper returns a pool of two keys, k1 and k2, of service "svc"
// whose events go to a Keeper over st.
func newTestKeeper(t *testing.T, st StatusWriter, cfg Config) (*keypool.Pool, *Keeper) {
	t.Helper()
	var k *Keeper
	pool, err := keypool.New(keypool.Config{OnEvent: func(e keypool.Event) { k.Observe(e) }})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Store, cfg.Logger = st, slog.New(slog.DiscardHandler)
	k = New(pool, cfg)
	if err := pool.SetService(keypool.Service{Name: "svc"}, []keypool.Key{{ID: "k1", Secret: "sk-1"}, {ID: "k2", Secret: "sk-2"}}); err != nil {
		t.Fatal(err)
	}
	return pool, k
}

// TestAppliedKeyEventsAreNeitherSharedNorPersisted: a key state change the
// pool applied from another replica (Pool.Apply, Event.Remote) is not
// published back to the replicas nor queued for the store, so it cannot
// echo between replicas; the same change decided here is both.
func TestAppliedKeyEventsAreNeitherSharedNorPersisted(t *testing.T) {
	pool, k := newTestKeeper(t, &fakeStore{}, Config{QueueSize: 4})
	k.Share(nil) // nothing is published: the test reads the queue
	sh := k.share.Load()

	if !pool.Apply(keypool.Event{Service: "svc", KeyID: "k1", State: keypool.StateInvalid, Reason: "401 on replica b", At: time.Now()}) {
		t.Fatal("Apply did not find k1")
	}
	if st, _ := pool.Stats("svc"); st[0].State != keypool.StateInvalid {
		t.Fatalf("k1 after Apply: %v, want invalid", st[0].State)
	}
	if len(sh.out) != 0 || len(k.queue) != 0 {
		t.Fatalf("an applied event was queued: %d to share, %d to persist", len(sh.out), len(k.queue))
	}

	pool.SetKeyState("svc", "k2", keypool.StateInvalid, time.Time{}, "401 here")
	if len(sh.out) != 1 || len(k.queue) != 1 {
		t.Fatalf("a change made here: %d to share, %d to persist, want 1 and 1", len(sh.out), len(k.queue))
	}
}

// TestLastingStatesArePersisted: an invalid key and a key exhausted
// without a reset are written to the store (by the running Keeper, and
// what is still queued by Close); a cooling key, a key exhausted until a
// reset and an external key are not. OnEvent counts every local change;
// OnDropped sees what a full queue turned away.
func TestLastingStatesArePersisted(t *testing.T) {
	st := &fakeStore{}
	var mu sync.Mutex
	var counted, dropped []string
	pool, k := newTestKeeper(t, st, Config{
		QueueSize: 2,
		OnEvent: func(e keypool.Event) {
			mu.Lock()
			counted = append(counted, e.KeyID+" "+e.State.String())
			mu.Unlock()
		},
		OnDropped: func(e keypool.Event) {
			mu.Lock()
			dropped = append(dropped, e.KeyID)
			mu.Unlock()
		},
	})
	if err := pool.SetService(keypool.Service{Name: "svc"}, []keypool.Key{{ID: "k1", Secret: "sk-1"}, {ID: "k2", Secret: "sk-2"},
		{ID: "k3", Secret: "sk-3"}, {ID: external.KeyIDPrefix + "x", Secret: "sk-x"}}); err != nil {
		t.Fatal(err)
	}
	// Not started: changes wait in the queue (of two).
	pool.SetKeyState("svc", "k1", keypool.StateCooling, time.Now().Add(time.Minute), "429")
	pool.SetKeyState("svc", "k2", keypool.StateExhausted, time.Now().Add(time.Hour), "quota, resets")
	pool.SetKeyState("svc", external.KeyIDPrefix+"x", keypool.StateInvalid, time.Time{}, "401")
	pool.SetKeyState("svc", "k1", keypool.StateInvalid, time.Time{}, "401")
	pool.SetKeyState("svc", "k2", keypool.StateExhausted, time.Time{}, "spent")
	pool.SetKeyState("svc", "k3", keypool.StateInvalid, time.Time{}, "403") // the queue is full
	if got := len(k.queue); got != 2 {
		t.Fatalf("queued %d, want 2", got)
	}
	mu.Lock()
	if len(counted) != 6 || len(dropped) != 1 || dropped[0] != "k3" {
		t.Errorf("counted %v, dropped %v; want 6 counted and k3 dropped", counted, dropped)
	}
	mu.Unlock()

	ctx, cancel := context.WithCancel(context.Background())
	k.Start(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for len(st.calls()) < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	pool.SetKeyState("svc", "k3", keypool.StateInvalid, time.Time{}, "403 again") // after Start's context ended
	k.Close(context.Background())
	want := []string{"k1 " + store.StatusInvalid + " 401", "k2 " + store.StatusExhausted + " spent", "k3 " + store.StatusInvalid + " 403 again"}
	got := st.calls()
	if len(got) != len(want) {
		t.Fatalf("persisted %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("persisted[%d] = %q, want %q", i, got[i], want[i])
		}
	}
}

// TestChargeByBalanceUnit: a request's spend is charged in the key's
// balance unit, and only a successful request counts in "requests".
func TestChargeByBalanceUnit(t *testing.T) {
	_, k := newTestKeeper(t, &fakeStore{}, Config{})
	cases := []struct {
		unit   string
		status int
		want   float64
	}{
		{"usd", 200, 0.25},
		{"USD", 500, 0.25},
		{"tokens", 200, 1200},
		{"requests", 200, 1},
		{"requests", 429, 0},
		{"", 200, 0},
		{"credits", 200, 0},
	}
	for _, tc := range cases {
		if got := k.Charge("svc", "k1", tc.unit, tc.status, 1200, 0.25); got != tc.want {
			t.Errorf("Charge(%q, %d) = %v, want %v", tc.unit, tc.status, got, tc.want)
		}
	}
}
