package keypool

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"
)

// Selector picks one key among the available ones. The pool calls Select
// with the service's lock held and only with keys that are in rotation
// (active or half-open, under their rate and in-flight limits), so a
// selector never sees a key that is cooling, open, invalid or exhausted.
// Select must be fast, must not block and must not call back into the
// Pool; returning nil or a key the pool then refuses (excluded by the
// request, say) makes the pool offer the selector a filtered list.
//
// A selector reads keys only through [Candidate]'s methods, as the
// built-in ones do, so any of them can be rewritten outside this package
// (examples/customselector has a variant of [Weighted]). A selector that
// needs per-key state keeps it in [Candidate.Scratch].
//
// Optional capabilities are separate interfaces found by type assertion;
// none are defined yet.
type Selector interface {
	Select(c *Candidates) *Candidate
}

// SelectorFunc adapts a function to a [Selector].
type SelectorFunc func(c *Candidates) *Candidate

// Select calls f(c).
func (f SelectorFunc) Select(c *Candidates) *Candidate { return f(c) }

// Candidates is the list of keys a [Selector] chooses from, valid only
// during the call.
type Candidates struct {
	list     []*keyState
	affinity string
	now      time.Time
}

// Len returns the number of candidates; it is at least 1.
func (c *Candidates) Len() int { return len(c.list) }

// At returns the i-th candidate.
func (c *Candidates) At(i int) *Candidate { return &c.list[i].view }

// Affinity returns the request's affinity value ([Request.Affinity]).
func (c *Candidates) Affinity() string { return c.affinity }

// RoundRobin takes available keys in turn. Its zero value is ready; it is
// safe to share between services.
type RoundRobin struct{ n atomic.Uint64 }

// Select returns the next key in turn.
func (r *RoundRobin) Select(c *Candidates) *Candidate {
	return c.At(int(r.n.Add(1)-1) % c.Len())
}

// Weighted is smooth weighted round robin (as in nginx): over any run of
// picks each key's share follows its weight, interleaved rather than in
// blocks. Each key's current weight lives in its [Candidate.Scratch]. It
// costs O(available keys) per pick.
type Weighted struct{}

// Select returns the key with the highest current weight.
func (Weighted) Select(c *Candidates) *Candidate {
	var best *Candidate
	var bestCur, total int64
	for i := 0; i < c.Len(); i++ {
		k := c.At(i)
		w := int64(k.Weight())
		cur := k.Scratch()
		*cur += w
		total += w
		if best == nil || *cur > bestCur {
			best, bestCur = k, *cur
		}
	}
	*best.Scratch() -= total
	return best
}

// Random picks a key uniformly at random.
type Random struct{}

// Select returns a random key.
func (Random) Select(c *Candidates) *Candidate { return c.At(rand.IntN(c.Len())) }

// LeastInFlight picks the key with the fewest requests in flight, breaking
// ties in turn. It costs O(available keys) per pick.
type LeastInFlight struct{ n atomic.Uint64 }

// Select returns the least busy key.
func (l *LeastInFlight) Select(c *Candidates) *Candidate {
	n := c.Len()
	start := int(l.n.Add(1)-1) % n
	best := c.At(start)
	for i := 1; i < n && best.InFlight() > 0; i++ {
		k := c.At((start + i) % n)
		if k.InFlight() < best.InFlight() {
			best = k
		}
	}
	return best
}

// LeastUsed picks the key with the most balance or quota left (keys with
// no known balance count as unlimited), breaking ties in turn. It costs
// O(available keys) per pick.
type LeastUsed struct{ n atomic.Uint64 }

// Select returns the key with the most left.
func (l *LeastUsed) Select(c *Candidates) *Candidate {
	return bestFrom(c, &l.n, func(k, best *Candidate) bool { return k.Remaining() > best.Remaining() })
}

// bestFrom scans the candidates from a rotating start and returns the
// first that no later one beats, so ties take turns.
func bestFrom(c *Candidates, turn *atomic.Uint64, better func(k, best *Candidate) bool) *Candidate {
	n := c.Len()
	start := int(turn.Add(1)-1) % n
	best := c.At(start)
	for i := 1; i < n; i++ {
		if k := c.At((start + i) % n); better(k, best) {
			best = k
		}
	}
	return best
}

// Latency is the power of two choices on each key's latency EWMA: two keys
// at random, the faster wins (fewer in flight on a tie). Keys not yet
// measured count as fastest, so new keys are tried.
type Latency struct{}

// Select returns the faster of two random keys.
func (Latency) Select(c *Candidates) *Candidate {
	n := c.Len()
	a := c.At(rand.IntN(n))
	if n == 1 {
		return a
	}
	b := c.At(rand.IntN(n))
	la, lb := a.Latency(), b.Latency()
	if lb < la || (lb == la && b.InFlight() < a.InFlight()) {
		return b
	}
	return a
}

// Sticky sends requests with the same affinity ([Request.Affinity]) to the
// same key while that key stays available (rendezvous hashing, so a key
// leaving moves only its own clients). Requests without affinity fall back
// to Fallback (round robin if nil). It costs O(available keys) per pick.
type Sticky struct {
	Fallback Selector
	rr       RoundRobin
}

// Select returns the affinity's key.
func (s *Sticky) Select(c *Candidates) *Candidate {
	a := c.Affinity()
	if a == "" {
		if s.Fallback != nil {
			return s.Fallback.Select(c)
		}
		return s.rr.Select(c)
	}
	h := hashString(a)
	var best *Candidate
	var bestScore uint64
	for i := 0; i < c.Len(); i++ {
		k := c.At(i)
		if sc := mix64(h ^ k.IDHash()); best == nil || sc > bestScore {
			best, bestScore = k, sc
		}
	}
	return best
}

// Ordered picks the available key with the lowest Priority, so lower
// priorities serve while they can and higher ones take over when they
// cannot; keys of equal priority take turns. It costs O(available keys)
// per pick.
type Ordered struct{ n atomic.Uint64 }

// Select returns the first key by priority.
func (o *Ordered) Select(c *Candidates) *Candidate {
	return bestFrom(c, &o.n, func(k, best *Candidate) bool { return k.Priority() < best.Priority() })
}

// mix64 is the splitmix64 finaliser.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// SelectorNames lists the names [ParseSelector] accepts.
var SelectorNames = []string{"round_robin", "weighted", "random", "least_in_flight", "least_used", "latency", "sticky", "ordered"}

// ParseSelector returns a new built-in selector by name; "" means
// round_robin.
func ParseSelector(name string) (Selector, error) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "", "round_robin", "round-robin", "roundrobin":
		return &RoundRobin{}, nil
	case "weighted":
		return Weighted{}, nil
	case "random":
		return Random{}, nil
	case "least_in_flight", "least-in-flight":
		return &LeastInFlight{}, nil
	case "least_used", "least-used":
		return &LeastUsed{}, nil
	case "latency":
		return Latency{}, nil
	case "sticky":
		return &Sticky{}, nil
	case "ordered", "priority":
		return &Ordered{}, nil
	}
	return nil, fmt.Errorf("%w: unknown selector %q (want one of %s)", ErrInvalidConfig, name, strings.Join(SelectorNames, ", "))
}

var (
	_ Selector = (*RoundRobin)(nil)
	_ Selector = Weighted{}
	_ Selector = Random{}
	_ Selector = (*LeastInFlight)(nil)
	_ Selector = (*LeastUsed)(nil)
	_ Selector = Latency{}
	_ Selector = (*Sticky)(nil)
	_ Selector = (*Ordered)(nil)
	_ Selector = SelectorFunc(nil)
)

// hashString is FNV-1a, 64 bit.
func hashString(v string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(v); i++ {
		h ^= uint64(v[i])
		h *= 1099511628211
	}
	return h
}
