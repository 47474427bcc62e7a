package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/storetest"
)

func TestListenSQLiteUnsupported(t *testing.T) {
	s := openAt(t, sqliteDSN(t), Options{Keyring: testKeyring(t)})
	err := s.Listen(context.Background(), func() {})
	if !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Listen on SQLite = %v, want errors.ErrUnsupported", err)
	}
}

// TestNotifyPropagation writes through one Store and measures how long a
// second pool, synced from a second Store on the same PostgreSQL database
// with a one-minute poll interval, takes to see each new key: only
// LISTEN/NOTIFY can bring it within the one second allowed.
func TestNotifyPropagation(t *testing.T) {
	dsn := storetest.PostgresDSN(t)
	kr := testKeyring(t)
	a := openAt(t, dsn, Options{Keyring: kr, Logger: quiet})
	b := openAt(t, dsn, Options{Keyring: kr, Logger: quiet})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	poolFor := func(src *Store) (*keypool.Pool, *store.Syncer, chan error) {
		p, err := keypool.New(keypool.Config{})
		if err != nil {
			t.Fatal(err)
		}
		sy := store.NewSyncer(p, src, store.SyncerOptions{Interval: time.Minute, Notify: src, Logger: quiet})
		if err := sy.Load(ctx); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- sy.Run(ctx) }()
		return p, sy, done
	}
	poolA, _, doneA := poolFor(a)
	poolB, _, doneB := poolFor(b)

	if err := a.CreateService(ctx, &store.Service{Name: "exa", BaseURL: "https://api.exa.ai", AuthScheme: "x-api-key"}); err != nil {
		t.Fatal(err)
	}
	has := func(p *keypool.Pool, id string) bool {
		st, _ := p.Stats("exa")
		return slices.ContainsFunc(st, func(k keypool.KeyStats) bool { return k.ID == id })
	}
	wait := func(what string, cond func() bool) time.Duration {
		start := time.Now()
		for !cond() {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(start)
	}
	wait("service in pool B", func() bool { return slices.Contains(poolB.Services(), "exa") })

	const n = 20
	var lat []time.Duration
	for i := range n {
		k := &store.Key{Service: "exa", Secret: keypool.Secret(fmt.Sprintf("exa-secret-%02d", i)), Status: store.StatusActive}
		start := time.Now()
		if err := a.CreateKeys(ctx, []*store.Key{k}); err != nil {
			t.Fatal(err)
		}
		wait("key in pool B", func() bool { return has(poolB, k.ID) })
		lat = append(lat, time.Since(start))
		wait("key in pool A", func() bool { return has(poolA, k.ID) })
	}
	slices.Sort(lat)
	t.Logf("NOTIFY propagation store A → pool B over %d changes: median %v, min %v, max %v",
		n, lat[n/2], lat[0], lat[n-1])
	if lat[n-1] > time.Second {
		t.Errorf("slowest propagation %v, want within 1s", lat[n-1])
	}

	// A delete propagates too.
	st, _ := poolB.Stats("exa")
	if err := a.DeleteKey(ctx, st[0].ID); err != nil {
		t.Fatal(err)
	}
	wait("key deleted from pool B", func() bool { return !has(poolB, st[0].ID) })

	// Kill both listening connections: they reconnect, and a change made
	// meanwhile still arrives without waiting for the poll interval.
	var killed int
	if err := a.w.WithContext(ctx).Raw(`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND query = 'LISTEN ` + NotifyChannel + `' AND pid <> pg_backend_pid()`).Scan(&killed).Error; err != nil {
		t.Fatal(err)
	}
	if killed != 2 {
		t.Errorf("terminated %d listening connections, want 2", killed)
	}
	k := &store.Key{Service: "exa", Secret: "exa-after-reconnect", Status: store.StatusActive}
	if err := a.CreateKeys(ctx, []*store.Key{k}); err != nil {
		t.Fatal(err)
	}
	t.Logf("after the listener was killed: key in pool B after %v", wait("key in pool B after reconnect", func() bool { return has(poolB, k.ID) }))

	cancel()
	for _, done := range []chan error{doneA, doneB} {
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
	}
}
