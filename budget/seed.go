package budget

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/store"
)

// UsageQuerier reads stored usage (every [store.Store] does).
type UsageQuerier interface {
	QueryUsage(ctx context.Context, q store.UsageQuery) ([]store.UsageRow, error)
}

// seedBatch is how many counters one write of a seed charges (one script
// run on Redis).
const seedBatch = 128

// Seed charges the counters with the stored usage of the current hour,
// day and month (UTC) and of all stored time, per token, team and
// service, so that a restart does not reset a budget, and returns how
// many scopes it charged. It reads one usage query per window (the four
// at once: q must be safe for concurrent use) and writes the counters
// seedBatch at a time; an error reading or writing fails the
// seed, and a seed retried after a failed write does not count twice on
// Redis (each part is charged once per counter, see
// [limit.Settlement].ID). Usage older than the store's retention is
// gone, so a total limit counts from then.
func (b *Budgets) Seed(ctx context.Context, q UsageQuerier, now time.Time) (int, error) {
	hourStart, _ := limit.WindowBounds(limit.Hour, now)
	dayStart, _ := limit.WindowBounds(limit.Day, now)
	monthStart, _ := limit.WindowBounds(limit.Month, now)
	type sums struct{ tok, cost [4]float64 } // total, month, day, hour
	since := [4]time.Time{{}, monthStart, dayStart, hourStart}
	// A router's counters are its service counters: its usage is grouped
	// by router (a routed record's service is the target that served).
	groups := []string{store.GroupToken, store.GroupTeam, store.GroupService, store.GroupRouter}
	kinds := [...]Kind{Token, Team, Service, Service}
	per := map[string]*sums{} // by "<kind>:<id>"
	// The four windows' queries run at once: budgeted requests wait for
	// the seed after a Redis restart-empty.
	var rowsOf [4][]store.UsageRow
	var errs [4]error
	var wg sync.WaitGroup
	for wi, from := range since {
		wg.Go(func() {
			rowsOf[wi], errs[wi] = q.QueryUsage(ctx, store.UsageQuery{Since: from, Until: now.Add(time.Second), GroupBy: groups})
		})
	}
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		return 0, fmt.Errorf("budget: seed from usage: %w", err)
	}
	for wi, rows := range rowsOf {
		for _, row := range rows {
			for gi, g := range groups {
				id := row.Group[g]
				if id == "" {
					continue
				}
				base := kinds[gi].String() + ":" + id
				sm := per[base]
				if sm == nil {
					sm = &sums{}
					per[base] = sm
				}
				sm.tok[wi] += float64(row.TokensIn + row.TokensOut)
				sm.cost[wi] += row.Cost
			}
		}
	}
	// Charge oldest first, each part at a time inside its own window:
	// before this month, this month before today, today before this
	// hour, this hour.
	at := [4]time.Time{monthStart.Add(-time.Second), dayStart.Add(-time.Second), hourStart.Add(-time.Second), hourStart}
	ss := make([]limit.Settlement, 0, seedBatch)
	flush := func(at time.Time) error {
		if len(ss) == 0 {
			return nil
		}
		err := b.c.SettleAll(ctx, ss, at)
		ss = ss[:0]
		if err != nil {
			return fmt.Errorf("budget: seed counters: %w", err)
		}
		return nil
	}
	for i := range 4 {
		id := "seed:" + strconv.Itoa(i)
		for base, sm := range per {
			tok, cost := sm.tok[i], sm.cost[i]
			if i < 3 {
				tok -= sm.tok[i+1]
				cost -= sm.cost[i+1]
			}
			if tok > 0.5 {
				ss = append(ss, limit.Settlement{Key: unitPrefix[Tokens] + base, Actual: tok, ID: id})
			}
			if cost > 1e-9 {
				ss = append(ss, limit.Settlement{Key: unitPrefix[Cost] + base, Actual: cost, ID: id})
			}
			if len(ss) >= seedBatch-1 {
				if err := flush(at[i]); err != nil {
					return 0, err
				}
			}
		}
		if err := flush(at[i]); err != nil {
			return 0, err
		}
	}
	return len(per), nil
}
