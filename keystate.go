package keypool

import (
	"math"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/breaker"
	"golang.org/x/time/rate"
)

// Candidate is a key's live state as a [Selector] sees it. Its methods are
// safe to call from Select (which runs under the service's lock).
type Candidate struct {
	svc      *svcState
	gen      atomic.Uint64
	inFlight atomic.Int64
	ewma     atomic.Int64 // latency EWMA in nanoseconds
	capped   atomic.Bool  // out of rotation because in-flight is at the cap
	slow     atomic.Bool  // state is not Active: Release must take the lock
	brk      atomic.Pointer[breaker.Breaker]
	idHash   uint64

	// The fields below are protected by svc.mu.
	key        *Key
	storedSt   State
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
	swrr       int64 // smooth weighted round robin's current weight
	buckets    [12]uint32
	bucketBase int64 // index of buckets[0]'s 5-second slot
}

// ID returns the key's id.
func (c *Candidate) ID() string { return c.key.ID }

// Key returns the key's settings. Do not modify it.
func (c *Candidate) Key() *Key { return c.key }

// InFlight returns how many requests are using the key now.
func (c *Candidate) InFlight() int64 { return c.inFlight.Load() }

// Weight returns the key's weight (at least 1).
func (c *Candidate) Weight() int {
	if c.key.Weight <= 0 {
		return 1
	}
	return c.key.Weight
}

// Latency returns the key's latency EWMA; zero before its first answer.
func (c *Candidate) Latency() time.Duration { return time.Duration(c.ewma.Load()) }

// Remaining returns the key's balance or quota left, +Inf when unknown.
func (c *Candidate) Remaining() float64 {
	if c.key.BalanceTotal <= 0 {
		return math.Inf(1)
	}
	return c.key.BalanceTotal - c.key.BalanceUsed - c.spent
}

// State returns the key's state (Active or HalfOpen for a candidate).
func (c *Candidate) State() State { return c.state }
