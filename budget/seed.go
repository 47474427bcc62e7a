package budget

import (
	"context"
	"fmt"
	"time"

	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/store"
)

// UsageQuerier reads stored usage (every [store.Store] does).
type UsageQuerier interface {
	QueryUsage(ctx context.Context, q store.UsageQuery) ([]store.UsageRow, error)
}

// Seed charges the counters with the stored usage of the current hour,
// day and month (UTC) and of all stored time, per token, team and
// service, so that a restart does not reset a budget, and returns how
// many scopes it charged. Usage older than the store's retention is gone,
// so a total limit counts from then.
func (b *Budgets) Seed(ctx context.Context, q UsageQuerier, now time.Time) (int, error) {
	hourStart, _ := limit.WindowBounds(limit.Hour, now)
	dayStart, _ := limit.WindowBounds(limit.Day, now)
	monthStart, _ := limit.WindowBounds(limit.Month, now)
	type sums struct{ tok, cost [4]float64 } // total, month, day, hour
	since := [4]time.Time{{}, monthStart, dayStart, hourStart}
	// A router's counters are its service counters: its usage is grouped
	// by router (a routed record's service is the target that served).
	groups := [...]struct {
		dim  string
		kind Kind
	}{{store.GroupToken, Token}, {store.GroupTeam, Team}, {store.GroupService, Service}, {store.GroupRouter, Service}}
	n := 0
	for _, grp := range groups {
		g := grp.dim
		per := map[string]*sums{}
		for wi, from := range since {
			rows, err := q.QueryUsage(ctx, store.UsageQuery{Since: from, Until: now.Add(time.Second), GroupBy: []string{g}})
			if err != nil {
				return n, fmt.Errorf("budget: seed from usage: %w", err)
			}
			for _, row := range rows {
				id := row.Group[g]
				if id == "" {
					continue
				}
				sm := per[id]
				if sm == nil {
					sm = &sums{}
					per[id] = sm
				}
				sm.tok[wi] = float64(row.TokensIn + row.TokensOut)
				sm.cost[wi] = row.Cost
			}
		}
		// Charge oldest first, each part at a time inside its own
		// window: before this month, this month before today, today
		// before this hour, this hour.
		at := [4]time.Time{monthStart.Add(-time.Second), dayStart.Add(-time.Second), hourStart.Add(-time.Second), hourStart}
		for id, sm := range per {
			base := grp.kind.String() + ":" + id
			for i := range 4 {
				tok, cost := sm.tok[i], sm.cost[i]
				if i < 3 {
					tok -= sm.tok[i+1]
					cost -= sm.cost[i+1]
				}
				if tok > 0.5 {
					_ = b.c.Add(ctx, unitPrefix[Tokens]+base, tok, at[i])
				}
				if cost > 1e-9 {
					_ = b.c.Add(ctx, unitPrefix[Cost]+base, cost, at[i])
				}
			}
			n++
		}
	}
	return n, nil
}
