// Command customselector shows how to write a keypool.Selector, and how to
// wrap a built-in one.
//
// cheapestFirst prefers keys labelled tier=free and falls back to paid
// keys only when no free key is available; within a tier it defers to
// round robin. logged wraps any selector to count its picks. byBalance is
// a variant of keypool.Weighted written outside the package: the same
// smooth weighted round robin, through the same Candidate methods, with
// each key weighted by the balance it has left.
//
//	go run ./examples/customselector
package main

import (
	"fmt"
	"io"
	"log"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/keypool/keypool"
)

// cheapestFirst picks a free-tier key when one is available.
type cheapestFirst struct {
	rr keypool.RoundRobin
}

// Select implements keypool.Selector.
func (s *cheapestFirst) Select(c *keypool.Candidates) *keypool.Candidate {
	for i := 0; i < c.Len(); i++ {
		// Rotate the starting point so free keys share the load.
		k := s.rr.Select(c)
		if k.Label("tier") == "free" {
			return k
		}
	}
	return s.rr.Select(c)
}

// logged wraps a selector and counts which keys it picked.
type logged struct {
	next  keypool.Selector
	picks map[string]int
}

// Select implements keypool.Selector.
func (l *logged) Select(c *keypool.Candidates) *keypool.Candidate {
	k := l.next.Select(c)
	if k != nil {
		l.picks[k.ID()]++
	}
	return k
}

// byBalance is keypool.Weighted with each key's weight taken from its
// balance left instead of Key.Weight, so keys run dry together. Like
// Weighted it keeps each key's current weight in Candidate.Scratch.
type byBalance struct{}

// Select implements keypool.Selector.
func (byBalance) Select(c *keypool.Candidates) *keypool.Candidate {
	var best *keypool.Candidate
	var total int64
	for i := 0; i < c.Len(); i++ {
		k := c.At(i)
		w := int64(max(1, min(k.Remaining(), 1e9))) // +Inf: unknown balance
		*k.Scratch() += w
		total += w
		if best == nil || *k.Scratch() > *best.Scratch() {
			best = k
		}
	}
	*best.Scratch() -= total
	return best
}

func main() {
	if err := run(os.Stdout); err != nil {
		log.Fatal(err)
	}
}

func run(w io.Writer) error {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pool, err := keypool.New(keypool.Config{Now: func() time.Time { return now }})
	if err != nil {
		return err
	}
	sel := &logged{next: &cheapestFirst{}, picks: map[string]int{}}
	keys := []keypool.Key{
		{ID: "free-1", Secret: "free-key-1-xxxxxxxx", Labels: map[string]string{"tier": "free"}},
		{ID: "free-2", Secret: "free-key-2-xxxxxxxx", Labels: map[string]string{"tier": "free"}},
		{ID: "paid", Secret: "paid-key-xxxxxxxxxx", Labels: map[string]string{"tier": "paid"}},
	}
	if err := pool.SetService(keypool.Service{Name: "search", Selector: sel}, keys); err != nil {
		return err
	}
	use := func(n int, outcome keypool.OutcomeKind) {
		for i := 0; i < n; i++ {
			l, err := pool.Acquire("search", keypool.Request{})
			if err != nil {
				fmt.Fprintln(w, "no key:", err)
				return
			}
			l.Release(keypool.Outcome{Kind: outcome, RetryAfter: time.Minute})
		}
	}
	use(10, keypool.OK)
	report(w, "free keys share the load:", sel.picks)

	// Both free keys get rate-limited: the paid key takes over.
	use(2, keypool.RateLimited)
	sel.picks = map[string]int{}
	use(4, keypool.OK)
	report(w, "free keys cooling, paid serves:", sel.picks)

	// A minute later the free keys are back.
	now = now.Add(2 * time.Minute)
	sel.picks = map[string]int{}
	use(4, keypool.OK)
	report(w, "free keys back:", sel.picks)
	return weighByBalance(w, pool)
}

// weighByBalance spreads requests over two keys by the balance each has
// left: 300 and 100 credits, then 100 and 100 once the first spent 200.
func weighByBalance(w io.Writer, pool *keypool.Pool) error {
	sel := &logged{next: byBalance{}, picks: map[string]int{}}
	keys := []keypool.Key{
		{ID: "big", Secret: "big-key-xxxxxxxxxxx", BalanceTotal: 300},
		{ID: "small", Secret: "small-key-xxxxxxxxx", BalanceTotal: 100},
	}
	if err := pool.SetService(keypool.Service{Name: "chat", Selector: sel}, keys); err != nil {
		return err
	}
	var order strings.Builder
	for i := 0; i < 8; i++ {
		l, err := pool.Acquire("chat", keypool.Request{})
		if err != nil {
			return err
		}
		order.WriteString(l.KeyID()[:1])
		l.Release(keypool.Outcome{})
	}
	report(w, "by balance left, 300:100, order "+order.String()+":", sel.picks)

	pool.Spend("chat", "big", 200)
	sel.picks = map[string]int{}
	for i := 0; i < 8; i++ {
		l, err := pool.Acquire("chat", keypool.Request{})
		if err != nil {
			return err
		}
		l.Release(keypool.Outcome{})
	}
	report(w, "by balance left, 100:100:", sel.picks)
	return nil
}

func report(w io.Writer, title string, picks map[string]int) {
	ids := make([]string, 0, len(picks))
	for id := range picks {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	fmt.Fprint(w, title)
	for _, id := range ids {
		fmt.Fprintf(w, " %s=%d", id, picks[id])
	}
	fmt.Fprintln(w)
}

var (
	_ keypool.Selector = (*cheapestFirst)(nil)
	_ keypool.Selector = (*logged)(nil)
	_ keypool.Selector = byBalance{}
)
