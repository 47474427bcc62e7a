package limit

import (
	"sync"
	"sync/atomic"
)

// batcher coalesces concurrent calls to Redis: a call that arrives while
// fewer than inFlight batches are in flight is sent at once (a batch of
// one); calls that arrive while inFlight are in flight wait and are sent
// together, in arrival order, as the next batch, one script run for all
// of them. So a lone call waits for nothing, and under a burst the Redis
// round trips (and the per-call work of Redis itself) fall from one per
// call to one per batch, while the next batches are built and sent as
// Redis runs the one before (pipelined: Redis runs them one after the
// other, each atomically, and never waits for the client in between).
//
// The caller that finds a slot free runs the first batch in its own
// goroutine; if calls queued meanwhile, a goroutine runs the following
// batches until the queue is empty, and then returns.
type batcher[T any] struct {
	// run sends one batch and delivers every call's result; it must not
	// keep the slice.
	run func(batch []*T)
	// full reports whether a batch of these calls is as large as one run
	// should be.
	full func(batch []*T) bool
	// inFlight is the most batches in flight at once; 0 means 1.
	inFlight int

	mu      sync.Mutex // protects queue and running
	queue   []*T
	running int // batches in flight or about to be sent
}

// submit queues c and, when a slot is free, sends the batch it starts.
// The caller then waits for c's result, which run delivers.
func (b *batcher[T]) submit(c *T) {
	b.mu.Lock()
	b.queue = append(b.queue, c)
	if b.running >= max(b.inFlight, 1) {
		b.mu.Unlock()
		return
	}
	b.running++
	batch := b.take()
	b.mu.Unlock()
	b.run(batch)
	if b.next() {
		go b.drain()
	}
}

// take removes the next batch from the queue; b.mu must be held.
func (b *batcher[T]) take() []*T {
	n := 1
	for n < len(b.queue) && !b.full(b.queue[:n]) {
		n++
	}
	batch := make([]*T, n)
	copy(batch, b.queue)
	rest := copy(b.queue, b.queue[n:])
	clear(b.queue[rest:])
	b.queue = b.queue[:rest]
	return batch
}

// next reports whether calls are queued; if none, the caller's slot is
// free.
func (b *batcher[T]) next() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) == 0 {
		b.running--
		return false
	}
	return true
}

// drain sends the queued calls, batch after batch, until none is left.
func (b *batcher[T]) drain() {
	for {
		b.mu.Lock()
		if len(b.queue) == 0 {
			b.running--
			b.mu.Unlock()
			return
		}
		batch := b.take()
		b.mu.Unlock()
		b.run(batch)
	}
}

// Call states of a batched call: a caller whose context ends while its
// call waits marks it gone; the batch then releases what it reserved.
const (
	callWaiting int32 = iota
	callDone
	callGone
)

// callState is the handshake between a waiting caller and the batch that
// answers it: exactly one of deliver and leave succeeds.
type callState struct {
	state atomic.Int32
	done  chan struct{} // closed when the result is delivered
}

func newCallState() callState { return callState{done: make(chan struct{})} }

// deliver reports whether the caller still waits (then its result is
// final once done is closed); false: the caller left.
func (s *callState) deliver() bool {
	ok := s.state.CompareAndSwap(callWaiting, callDone)
	close(s.done)
	return ok
}

// leave reports whether the caller left before its result came; false:
// the result is delivered (or about to be), wait for done.
func (s *callState) leave() bool { return s.state.CompareAndSwap(callWaiting, callGone) }

// gone reports whether the caller left.
func (s *callState) gone() bool { return s.state.Load() == callGone }
