package keypool

import (
	"math"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/keypool/keypool/breaker"
)

// keyState is one key's live state in its service. It must not be copied.
type keyState struct {
	// Immutable after load, or atomic: read without the lock.
	svc      *svcState
	view     Candidate // the key as a Selector sees it; view.k is this
	idHash   uint64
	gen      atomic.Uint64
	inFlight atomic.Int64
	ewma     atomic.Int64 // latency EWMA in nanoseconds
	capped   atomic.Bool  // out of rotation because in-flight is at the cap
	slow     atomic.Bool  // state is not Active: Release must take the lock
	brk      atomic.Pointer[breaker.Breaker]

	// The fields below are protected by svc.mu.
	key        *Key
	storedSt   State // Key.State at the last load: applied only when it changes
	state      State
	reason     string
	until      time.Time
	limiter    *rate.Limiter
	featLim    map[string]*rate.Limiter
	maxIn      int64
	availIdx   int
	heapIdx    int
	wakeAt     time.Time
	throttled  bool
	consec429  int
	strikes    int  // ambiguous refusals since the last success
	held       bool // tripped beyond the ejection cap, kept in rotation
	spent      float64
	requests   uint64
	failures   uint64
	scratch    int64 // the selector's word (Candidate.Scratch)
	buckets    [12]uint32
	bucketBase int64 // index of buckets[0]'s 5-second slot
}

// newKeyState returns the live state of a key that was not loaded before.
func newKeyState(s *svcState, k *Key) *keyState {
	c := &keyState{svc: s, key: k, availIdx: -1, heapIdx: -1, idHash: hashString(k.ID)}
	c.view.k = c
	c.storedSt = StateActive
	c.state = StateActive
	return c
}

// remaining returns the key's balance or quota left, +Inf when unknown.
func (c *keyState) remaining() float64 {
	if c.key.BalanceTotal <= 0 {
		return math.Inf(1)
	}
	return c.key.BalanceTotal - c.key.BalanceUsed - c.spent
}

// Candidate is a key in rotation as a [Selector] sees it: a read-only view
// of its settings and live state, plus one word of scratch state for the
// selector. Candidates exist only inside the pool: a selector returns one
// of those it was offered. Its methods are meant to be called from Select,
// which runs under the service's lock.
type Candidate struct {
	k *keyState
}

// ID returns the key's id.
func (c *Candidate) ID() string { return c.k.key.ID }

// IDHash returns a 64-bit hash of the key's id (FNV-1a), computed once
// when the key is loaded; rendezvous hashing mixes it with a request's
// hash (see [Sticky]).
func (c *Candidate) IDHash() uint64 { return c.k.idHash }

// Key returns the key's settings (labels, features, balance). Do not
// modify it.
func (c *Candidate) Key() *Key { return c.k.key }

// Weight returns the key's weight (at least 1).
func (c *Candidate) Weight() int {
	if w := c.k.key.Weight; w > 0 {
		return w
	}
	return 1
}

// Priority returns the key's priority ([Key.Priority]): lower first.
func (c *Candidate) Priority() int { return c.k.key.Priority }

// Label returns the key's label name ([Key.Labels]), or "".
func (c *Candidate) Label(name string) string { return c.k.key.Labels[name] }

// State returns the key's state: Active, or HalfOpen while it takes a
// probe request.
func (c *Candidate) State() State { return c.k.state }

// InFlight returns how many requests are using the key now.
func (c *Candidate) InFlight() int64 { return c.k.inFlight.Load() }

// Latency returns the key's latency EWMA; zero before its first answer.
func (c *Candidate) Latency() time.Duration { return time.Duration(c.k.ewma.Load()) }

// Failures returns how many requests on the key failed ([Failure]) since
// it was loaded.
func (c *Candidate) Failures() uint64 { return c.k.failures }

// Remaining returns the key's balance or quota left, +Inf when unknown.
func (c *Candidate) Remaining() float64 { return c.k.remaining() }

// RateLeft returns how many more requests the key's own rate limit
// ([Key.RateLimitRPM]) admits at the time of the pick, +Inf when the key
// has none.
func (c *Candidate) RateLeft() float64 {
	if c.k.limiter == nil {
		return math.Inf(1)
	}
	return c.k.limiter.TokensAt(c.k.svc.cands.now)
}

// Scratch returns a word of per-key state that belongs to the service's
// selector: [Weighted] keeps each key's smooth weighted round robin
// weight there. It is zero for a new key, kept across reloads, and
// touched by nothing but Select, under the service's lock.
func (c *Candidate) Scratch() *int64 { return &c.k.scratch }
