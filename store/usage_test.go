package store

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

type fakeAppender struct {
	mu      sync.Mutex
	recs    []UsageRecord
	fail    int // fail this many calls first
	batches chan int
	pruned  chan time.Time
}

func newFake() *fakeAppender {
	return &fakeAppender{batches: make(chan int, 1000), pruned: make(chan time.Time, 10)}
}

func (f *fakeAppender) AppendUsage(_ context.Context, recs []UsageRecord) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail > 0 {
		f.fail--
		return errors.New("store down")
	}
	f.recs = append(f.recs, recs...)
	f.batches <- len(recs)
	return nil
}

func (f *fakeAppender) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.recs)
}

type pruningFake struct{ *fakeAppender }

func (p pruningFake) PruneUsage(_ context.Context, before time.Time) (int64, error) {
	p.pruned <- before
	return 0, nil
}

// waitBatch waits (bounded) for the fake to receive one batch.
func waitBatch(t *testing.T, f *fakeAppender) int {
	t.Helper()
	select {
	case n := <-f.batches:
		return n
	case <-time.After(10 * time.Second):
		t.Fatal("no batch written")
		return 0
	}
}

func rec(i int) UsageRecord {
	return UsageRecord{Time: time.Unix(int64(i), 0), Service: "svc", TokensIn: int64(i)}
}

func TestUsageWriter(t *testing.T) {
	never := make(chan time.Time)
	now := func() time.Time { return time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC) }
	noPrune := UsageWriterOptions{Retention: -1}

	t.Run("Close writes everything", func(t *testing.T) {
		f := newFake()
		w := newUsageWriter(f, noPrune, never, now)
		for i := range 2500 {
			w.Add(rec(i))
		}
		if err := w.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := f.count(); got != 2500 || w.Written() != 2500 || w.Dropped() != 0 {
			t.Fatalf("wrote %d (Written %d, Dropped %d), want 2500", got, w.Written(), w.Dropped())
		}
		for i, r := range f.recs {
			if r.TokensIn != int64(i) {
				t.Fatalf("record %d out of order", i)
			}
		}
	})

	t.Run("full batch flushes without a tick", func(t *testing.T) {
		f := newFake()
		w := newUsageWriter(f, UsageWriterOptions{BatchSize: 10, Retention: -1}, never, now)
		defer w.Close(context.Background())
		for i := range 10 {
			w.Add(rec(i))
		}
		if n := waitBatch(t, f); n != 10 {
			t.Fatalf("batch of %d, want 10", n)
		}
	})

	t.Run("tick flushes a partial batch", func(t *testing.T) {
		f := newFake()
		ticks := make(chan time.Time)
		w := newUsageWriter(f, noPrune, ticks, now)
		defer w.Close(context.Background())
		for i := range 3 {
			w.Add(rec(i))
		}
		ticks <- time.Time{}
		if n := waitBatch(t, f); n != 3 {
			t.Fatalf("batch of %d, want 3", n)
		}
	})

	t.Run("failed flush is retried", func(t *testing.T) {
		f := newFake()
		f.fail = 1
		ticks := make(chan time.Time)
		w := newUsageWriter(f, noPrune, ticks, now)
		for i := range 5 {
			w.Add(rec(i))
		}
		ticks <- time.Time{} // fails, records kept
		ticks <- time.Time{} // the run loop is past the failed flush now
		if n := waitBatch(t, f); n != 5 {
			t.Fatalf("batch of %d, want 5", n)
		}
		if err := w.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if f.count() != 5 || w.Dropped() != 0 {
			t.Fatalf("wrote %d, dropped %d; want 5, 0", f.count(), w.Dropped())
		}
	})

	t.Run("full buffer writes synchronously", func(t *testing.T) {
		f := newFake()
		w := newUsageWriter(f, UsageWriterOptions{BatchSize: 4, MaxBuffered: 4, Retention: -1}, never, now)
		defer w.Close(context.Background())
		for i := range 3 {
			w.Add(rec(i))
		}
		if f.count() != 0 {
			t.Fatalf("wrote %d before the buffer was full", f.count())
		}
		w.Add(rec(3)) // fills the buffer: written in this call
		if f.count() != 4 || w.Buffered() != 0 || w.Dropped() != 0 {
			t.Fatalf("after the full Add: written %d, buffered %d, dropped %d", f.count(), w.Buffered(), w.Dropped())
		}
	})

	t.Run("Close fails when the store is down", func(t *testing.T) {
		f := newFake()
		f.fail = 1 << 30
		w := newUsageWriter(f, noPrune, never, now)
		w.Add(rec(1))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := w.Close(ctx); err == nil {
			t.Fatal("Close succeeded with the store down")
		}
		if w.Dropped() != 1 {
			t.Fatalf("dropped %d, want 1", w.Dropped())
		}
	})

	t.Run("Add after Close is dropped", func(t *testing.T) {
		f := newFake()
		w := newUsageWriter(f, noPrune, never, now)
		if err := w.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		w.Add(rec(1))
		if w.Dropped() != 1 || f.count() != 0 {
			t.Fatalf("dropped %d, written %d", w.Dropped(), f.count())
		}
		if err := w.Close(context.Background()); !errors.Is(err, ErrUsageWriterClosed) {
			t.Fatalf("second Close: %v", err)
		}
	})

	t.Run("prunes past retention", func(t *testing.T) {
		f := pruningFake{newFake()}
		w := newUsageWriter(f, UsageWriterOptions{}, never, now)
		defer w.Close(context.Background())
		select {
		case before := <-f.pruned:
			if want := now().Add(-30 * 24 * time.Hour); !before.Equal(want) {
				t.Fatalf("pruned before %v, want %v", before, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no prune at start")
		}
	})

	t.Run("negative retention disables pruning", func(t *testing.T) {
		f := pruningFake{newFake()}
		w := newUsageWriter(f, noPrune, never, now)
		if err := w.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if len(f.pruned) != 0 {
			t.Fatal("pruned with retention disabled")
		}
	})
}
