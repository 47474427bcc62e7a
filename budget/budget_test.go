package budget_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/store"
)

func newBudgets(t *testing.T, cfg budget.Config) *budget.Budgets {
	t.Helper()
	l, err := limit.NewLocal(limit.LocalConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return budget.New(l, cfg)
}

// TestReserveRefusesPastTheBlockThreshold pins admission: requests are
// admitted while settled usage plus reservations is under the block
// threshold, the refusal names the scope and the window's end, and
// settling replaces the estimate with the actual usage.
func TestReserveRefusesPastTheBlockThreshold(t *testing.T) {
	var refused atomic.Int64
	b := newBudgets(t, budget.Config{OnRefused: func(k budget.Kind, w string, u budget.Unit) {
		if k == budget.Team && w == "day" && u == budget.Tokens {
			refused.Add(1)
		}
	}})
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	team := b.Scope(budget.Team, "t1", &store.Limits{DailyTokenLimit: 1000})
	scopes := [budget.NumKinds]*budget.Scope{budget.Team: team}
	ctx := context.Background()

	var h1, h2 budget.Holds
	if err := b.Reserve(ctx, &h1, scopes, 600, 0, now); err != nil {
		t.Fatalf("first request: %v", err)
	}
	if err := b.Reserve(ctx, &h2, scopes, 600, 0, now); err != nil {
		t.Fatalf("second request (600 reserved < 1000): %v", err)
	}
	var h3 budget.Holds
	err := b.Reserve(ctx, &h3, scopes, 1, 0, now)
	var ref *budget.Refusal
	if !errors.As(err, &ref) || ref.Scope != budget.Team || ref.RetryAfter() != 12*time.Hour ||
		!strings.Contains(err.Error(), "team daily tokens limit is 1000 tokens") {
		t.Fatalf("third request: %v, want a team daily refusal retrying at midnight", err)
	}
	if refused.Load() != 1 {
		t.Errorf("OnRefused calls: %d", refused.Load())
	}
	// Settling with less than the estimate frees room.
	b.Settle(&h1, 100, 0, now)
	b.Settle(&h2, 100, 0, now)
	if err := b.Reserve(ctx, &h3, scopes, 700, 0, now); err != nil {
		t.Errorf("after settling 200 of 1200 reserved: %v", err)
	}
}

// TestReserveUnderConcurrencyAdmitsWhatFits runs 200 parallel requests
// of 10 tokens against a 500-token budget: at most 50 are admitted.
func TestReserveUnderConcurrencyAdmitsWhatFits(t *testing.T) {
	b := newBudgets(t, budget.Config{})
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	scopes := [budget.NumKinds]*budget.Scope{budget.Token: b.Scope(budget.Token, "k", &store.Limits{LimitTokensHourBlock: 500})}
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for range 200 {
		wg.Go(func() {
			var h budget.Holds
			if err := b.Reserve(context.Background(), &h, scopes, 10, 0, now); err == nil {
				admitted.Add(1)
			}
		})
	}
	wg.Wait()
	if n := admitted.Load(); n != 50 {
		t.Errorf("admitted %d of 200, want 50", n)
	}
}

// TestWarningNamesTheBudgetAndShare pins the warning text of a request
// admitted past a warn threshold.
func TestWarningNamesTheBudgetAndShare(t *testing.T) {
	b := newBudgets(t, budget.Config{})
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	scopes := [budget.NumKinds]*budget.Scope{budget.Service: budget.NewScope(budget.Service, "svc", &store.Limits{LimitCostDayWarn: 1, LimitCostDayBlock: 2})}
	var h budget.Holds
	if err := b.Reserve(context.Background(), &h, scopes, 0, 1.7, now); err != nil {
		t.Fatal(err)
	}
	if h.Warning != "service day cost 85%" {
		t.Errorf("warning %q", h.Warning)
	}
}

// usageRows is a stored-usage fake: every query returns its rows.
type usageRows []store.UsageRow

func (u usageRows) QueryUsage(_ context.Context, q store.UsageQuery) ([]store.UsageRow, error) {
	return u, nil
}

// TestSeedChargesStoredUsage pins that seeding charges the stored usage,
// so a restart does not reset a budget.
func TestSeedChargesStoredUsage(t *testing.T) {
	b := newBudgets(t, budget.Config{})
	now := time.Date(2026, 3, 1, 12, 30, 0, 0, time.UTC)
	rows := usageRows{{Group: map[string]string{store.GroupTeam: "t1"}, TokensIn: 800, TokensOut: 200}}
	lims := &store.Limits{LimitTokensHourBlock: 1000}
	// Unseeded, the hour's budget is untouched.
	fresh := newBudgets(t, budget.Config{})
	var h budget.Holds
	if err := fresh.Reserve(context.Background(), &h, [budget.NumKinds]*budget.Scope{budget.Team: fresh.Scope(budget.Team, "t1", lims)}, 50, 0, now); err != nil {
		t.Fatalf("unseeded: %v", err)
	}
	n, err := b.Seed(context.Background(), rows, now)
	if err != nil || n != 1 {
		t.Fatalf("Seed = %d, %v", n, err)
	}
	var h2 budget.Holds
	err = b.Reserve(context.Background(), &h2, [budget.NumKinds]*budget.Scope{budget.Team: b.Scope(budget.Team, "t1", lims)}, 50, 0, now)
	if !strings.Contains(errText(err), "1000 tokens used") {
		t.Errorf("after seeding 1000 stored tokens: %v, want a refusal counting them", err)
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
