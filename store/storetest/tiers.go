package storetest

import (
	"errors"
	"maps"
	"testing"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
)

// testTiers pins tiers: create, read, list, update, delete, validation,
// keys joining a tier (which must exist), Features filled from the tier on
// every read, and Version changing with every tier write.
func testTiers(t *testing.T, s store.Store) {
	ts, ok := s.(store.TierStore)
	if !ok {
		t.Skip("store does not implement store.TierStore")
	}
	ctx := ctxT(t)
	mkService(t, s, "svc")

	for _, bad := range []store.Tier{
		{Name: "", Features: map[string]int{"a": 1}},
		{Name: "a b", Features: map[string]int{"a": 1}},
		{Name: "empty"},
		{Name: "neg", Features: map[string]int{"a": -1}},
		{Name: "blank", Features: map[string]int{"": 1}},
	} {
		wantErr(t, "CreateTier "+bad.Name, ts.CreateTier(ctx, &bad), store.ErrInvalid)
	}
	pro := store.Tier{Name: "pro", Description: "paid", Features: map[string]int{"image-generation": 100, "chat": 0}}
	must(t, ts.CreateTier(ctx, &pro))
	wantErr(t, "CreateTier twice", ts.CreateTier(ctx, &store.Tier{Name: "pro", Features: map[string]int{"a": 1}}), store.ErrConflict)
	must(t, ts.CreateTier(ctx, &store.Tier{Name: "free", Features: map[string]int{"image-generation": 10}}))

	got, err := ts.GetTier(ctx, "pro")
	must(t, err)
	if got.Description != "paid" || !maps.Equal(got.Features, pro.Features) || got.CreatedAt.IsZero() {
		t.Fatalf("GetTier = %+v, want %+v", got, pro)
	}
	list, err := ts.ListTiers(ctx)
	must(t, err)
	if len(list) != 2 || list[0].Name != "free" || list[1].Name != "pro" {
		t.Fatalf("ListTiers = %+v, want free, pro", list)
	}

	wantErr(t, "key in unknown tier", s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: keypool.Secret("value-t-0"), Tier: "gold"}}), store.ErrInvalid)
	ks := []*store.Key{{Service: "svc", Secret: keypool.Secret("value-t-1"), Tier: "pro"}, {Service: "svc", Secret: keypool.Secret("value-t-2")}}
	must(t, s.CreateKeys(ctx, ks))
	k, err := s.GetKey(ctx, ks[0].ID)
	must(t, err)
	if k.Tier != "pro" || k.Features["image-generation"] != 100 {
		t.Fatalf("GetKey tier %q features %v, want pro with image-generation 100", k.Tier, k.Features)
	}

	v0, err := s.Version(ctx)
	must(t, err)
	pro.Features = map[string]int{"image-generation": 50}
	must(t, ts.UpdateTier(ctx, &pro))
	v1, err := s.Version(ctx)
	must(t, err)
	if v1 == v0 {
		t.Fatal("UpdateTier left Version unchanged; pools would keep the old features")
	}
	all, err := s.Keys(ctx, "svc")
	must(t, err)
	for _, k := range all {
		switch k.ID {
		case ks[0].ID:
			if k.Features["image-generation"] != 50 || len(k.Features) != 1 {
				t.Fatalf("Keys: tiered key features %v, want image-generation 50", k.Features)
			}
		case ks[1].ID:
			if k.Tier != "" || k.Features != nil {
				t.Fatalf("Keys: untiered key tier %q features %v", k.Tier, k.Features)
			}
		}
	}
	wantErr(t, "UpdateTier unknown", ts.UpdateTier(ctx, &store.Tier{Name: "gold", Features: map[string]int{"a": 1}}), store.ErrNotFound)
	wantErr(t, "UpdateKey unknown tier", s.UpdateKey(ctx, &store.Key{ID: ks[1].ID, Service: "svc", Tier: "gold"}), store.ErrInvalid)

	err = ts.DeleteTier(ctx, "pro")
	wantErr(t, "DeleteTier in use", err, store.ErrConflict)
	must(t, s.UpdateKey(ctx, &store.Key{ID: ks[0].ID, Service: "svc", Tier: "free"}))
	must(t, ts.DeleteTier(ctx, "pro"))
	if _, err := ts.GetTier(ctx, "pro"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTier after delete: %v, want ErrNotFound", err)
	}
	wantErr(t, "DeleteTier twice", ts.DeleteTier(ctx, "pro"), store.ErrNotFound)
	k, err = s.GetKey(ctx, ks[0].ID)
	must(t, err)
	if k.Tier != "free" || k.Features["image-generation"] != 10 {
		t.Fatalf("after move: tier %q features %v, want free with 10", k.Tier, k.Features)
	}
}
