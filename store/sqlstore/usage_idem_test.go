package sqlstore

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/keypool/keypool/store"
)

// TestAppendUsageIdempotent: appending the same records again (a journal
// replayed after a crash) stores each once and charges its key's balance
// once; records without an id are all kept.
func TestAppendUsageIdempotent(t *testing.T) {
	backends(t, func(t *testing.T, dsn func(t *testing.T) string) {
		ctx := context.Background()
		s := openAt(t, dsn(t), Options{Keyring: testKeyring(t)})
		if err := s.CreateService(ctx, &store.Service{Name: "svc"}); err != nil {
			t.Fatal(err)
		}
		k := &store.Key{Service: "svc", Secret: "sk-idempotent-0123456789", BalanceTotal: 100, BalanceUnit: "usd"}
		if err := s.CreateKeys(ctx, []*store.Key{k}); err != nil {
			t.Fatal(err)
		}
		at := time.Date(2025, 3, 10, 12, 0, 0, 0, time.UTC)
		recs := make([]store.UsageRecord, 150) // more than one prepared chunk
		for i := range recs {
			recs[i] = store.UsageRecord{Time: at, ID: fmt.Sprintf("rec-%03d", i), Service: "svc", KeyID: k.ID,
				Status: 200, TokensIn: 10, TokensOut: 5, Cost: 0.01, KeySpend: 0.01}
		}
		if err := s.AppendUsage(ctx, recs[:100]); err != nil {
			t.Fatal(err)
		}
		// Replay: all 150, the first 100 already stored, one record twice.
		replay := append(append([]store.UsageRecord(nil), recs...), recs[120])
		if err := s.AppendUsage(ctx, replay); err != nil {
			t.Fatal(err)
		}
		if err := s.AppendUsage(ctx, replay); err != nil {
			t.Fatal(err)
		}
		// Records without an id are never deduplicated.
		anon := store.UsageRecord{Time: at, Service: "svc", Status: 200}
		if err := s.AppendUsage(ctx, []store.UsageRecord{anon, anon}); err != nil {
			t.Fatal(err)
		}
		rows, err := s.QueryUsage(ctx, store.UsageQuery{})
		if err != nil || len(rows) != 1 {
			t.Fatal(rows, err)
		}
		if rows[0].Requests != 152 || rows[0].TokensIn != 1500 {
			t.Fatalf("requests %d tokens_in %d, want 152 and 1500", rows[0].Requests, rows[0].TokensIn)
		}
		got, err := s.GetKey(ctx, k.ID)
		if err != nil {
			t.Fatal(err)
		}
		if d := got.BalanceUsed - 1.5; d > 1e-9 || d < -1e-9 {
			t.Fatalf("balance_used = %v, want 1.5 (150 records of 0.01, each once)", got.BalanceUsed)
		}
		// A provisional record's spend comes from the key's unit.
		prov := store.UsageRecord{Time: at, ID: "prov-1", Service: "svc", KeyID: k.ID, Status: 200, Cost: 0.25, KeySpend: store.KeySpendByUnit}
		for range 2 {
			if err := s.AppendUsage(ctx, []store.UsageRecord{prov}); err != nil {
				t.Fatal(err)
			}
		}
		if got, _ := s.GetKey(ctx, k.ID); got.BalanceUsed < 1.75-1e-9 || got.BalanceUsed > 1.75+1e-9 {
			t.Fatalf("balance_used = %v after a provisional usd record of 0.25, want 1.75", got.BalanceUsed)
		}
	})
}
