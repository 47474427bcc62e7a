// Package storetest is the conformance suite every [store.Store] must
// pass, plus helpers for store tests ([PostgresDSN]).
//
// Call [Run] from an implementation's tests:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store { return openTestStore(t) })
//	}
//
// newStore must return an empty store, closed by a t.Cleanup it registers.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
)

// Run runs the conformance suite, one subtest per behaviour, each on a
// store of its own from newStore.
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"Services", testServices},
		{"Keys", testKeys},
		{"CreateKeysAllOrNothing", testCreateKeysAllOrNothing},
		{"KeyValueUniquePerService", testKeyValueUniquePerService},
		{"DeleteServiceCascades", testDeleteServiceCascades},
		{"Teams", testTeams},
		{"UsersAndTokens", testUsersAndTokens},
		{"DeleteTeamCascades", testDeleteTeamCascades},
		{"DeleteUserCascades", testDeleteUserCascades},
		{"NotFound", testNotFound},
		{"Version", testVersion},
		{"ConcurrentWriters", testConcurrentWriters},
		{"Usage", testUsage},
		{"PruneUsage", testPruneUsage},
		{"AdminUsers", testAdminUsers},
		{"Sessions", testSessions},
		{"Audit", testAudit},
		{"UsageStatusCounts", testUsageStatusCounts},
		{"Tiers", testTiers},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, newStore(t))
		})
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: err = %v, want %v", what, err, want)
	}
}

func mkService(t *testing.T, s store.Store, name string) store.Service {
	t.Helper()
	sv := store.Service{Name: name, BaseURL: "https://" + name + ".example", AuthScheme: "bearer"}
	must(t, s.CreateService(ctxT(t), &sv))
	return sv
}

func mkKeys(t *testing.T, s store.Store, service string, values ...string) []*store.Key {
	t.Helper()
	keys := make([]*store.Key, len(values))
	for i, v := range values {
		keys[i] = &store.Key{Service: service, Secret: keypool.Secret(v)}
	}
	must(t, s.CreateKeys(ctxT(t), keys))
	return keys
}

func mkTeam(t *testing.T, s store.Store, name string) store.Team {
	t.Helper()
	tm := store.Team{Name: name}
	must(t, s.CreateTeam(ctxT(t), &tm))
	return tm
}

func testServices(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	sv := store.Service{
		Name: "openai", DisplayName: "OpenAI", BaseURL: "https://api.openai.com", AuthScheme: "bearer",
		RateLimitRPM: 60, MaxInFlight: 4, ProxyHeaders: map[string]string{"Cartesia-Version": "2024-06-10"},
		Selector: "round_robin", ExternalName: "openai-ext", Prices: `{"gpt-4o":{"in":2.5}}`, LLMFamily: "openai",
		Description: "chat models", Disabled: true,
		Limits:    store.Limits{RPMLimit: 100, LimitCostDayBlock: 12.5, ModelsEnabled: []string{"gpt-4o"}},
		KeyPolicy: store.KeyPolicy{RetryAfterCap: 600, ConfirmRefusals: 4, MinActiveKeys: 2, MaxEjectionPercent: 30},
	}
	must(t, s.CreateService(ctx, &sv))
	if sv.CreatedAt.IsZero() || sv.UpdatedAt.IsZero() {
		t.Fatal("CreateService did not set timestamps")
	}
	mkService(t, s, "groq")

	got, err := s.GetService(ctx, "openai")
	must(t, err)
	if got.DisplayName != sv.DisplayName || got.BaseURL != sv.BaseURL || got.RateLimitRPM != 60 || got.MaxInFlight != 4 ||
		got.ProxyHeaders["Cartesia-Version"] != "2024-06-10" || got.Selector != "round_robin" ||
		got.ExternalName != "openai-ext" || got.Prices != sv.Prices || got.LLMFamily != "openai" || got.Limits.RPMLimit != 100 ||
		got.Limits.LimitCostDayBlock != 12.5 || !slices.Equal(got.ModelsEnabled, []string{"gpt-4o"}) ||
		got.KeyPolicy != sv.KeyPolicy || got.Description != "chat models" || !got.Disabled {
		t.Fatalf("GetService = %+v, want %+v", got, sv)
	}

	list, err := s.Services(ctx)
	must(t, err)
	if len(list) != 2 {
		t.Fatalf("Services: %d, want 2", len(list))
	}

	// A router keeps its kind and routes, and an update replaces them.
	rt := store.Service{Name: "llm", Kind: store.KindRouter, AuthScheme: "bearer", Routes: []store.Route{
		{Model: "claude-*", Targets: []store.Target{{Service: "openai", Path: "/v1", Model: "x", Weight: 2}, {Service: "groq"}}},
	}}
	must(t, s.CreateService(ctx, &rt))
	gotR, err := s.GetService(ctx, "llm")
	must(t, err)
	if gotR.Kind != store.KindRouter || len(gotR.Routes) != 1 || !slices.Equal(gotR.Routes[0].Targets, rt.Routes[0].Targets) {
		t.Fatalf("router = %+v, want %+v", gotR, rt)
	}
	if gotR.Router != nil {
		t.Fatalf("router settings = %+v, want none", gotR.Router)
	}
	settings := store.RouterSettings{MaxAttempts: 2, BreakerFailures: 5, BreakerOpenSeconds: 30, BreakerMaxOpenSeconds: 600}
	gotR.Routes = []store.Route{{Model: "fast", Targets: []store.Target{{Service: "groq"}}}}
	gotR.Router = &settings
	must(t, s.UpdateService(ctx, &gotR))
	if gotR, err = s.GetService(ctx, "llm"); err != nil || len(gotR.Routes) != 1 || gotR.Routes[0].Model != "fast" ||
		gotR.Router == nil || *gotR.Router != settings {
		t.Fatalf("router after update = %+v (settings %+v), %v", gotR, gotR.Router, err)
	}
	gotR.Router = nil
	must(t, s.UpdateService(ctx, &gotR))
	if gotR, err = s.GetService(ctx, "llm"); err != nil || gotR.Router != nil {
		t.Fatalf("router settings after clearing = %+v, %v", gotR.Router, err)
	}
	must(t, s.DeleteService(ctx, "llm"))

	dup := store.Service{Name: "openai", BaseURL: "https://x"}
	wantErr(t, "duplicate service", s.CreateService(ctx, &dup), store.ErrConflict)
	wantErr(t, "empty name", s.CreateService(ctx, &store.Service{}), store.ErrInvalid)

	got.DisplayName, got.RateLimitRPM, got.ProxyHeaders = "OpenAI 2", 120, nil
	got.KeyPolicy.MinActiveKeys = 3
	got.Disabled, got.Description = false, "switched on"
	must(t, s.UpdateService(ctx, &got))
	got2, err := s.GetService(ctx, "openai")
	must(t, err)
	if got2.KeyPolicy.MinActiveKeys != 3 || got2.KeyPolicy.RetryAfterCap != 600 {
		t.Fatalf("UpdateService key policy: %+v", got2.KeyPolicy)
	}
	must(t, err)
	if got2.DisplayName != "OpenAI 2" || got2.RateLimitRPM != 120 || len(got2.ProxyHeaders) != 0 || got2.Disabled || got2.Description != "switched on" {
		t.Fatalf("after update: %+v", got2)
	}
	if !got2.CreatedAt.Equal(sv.CreatedAt) {
		t.Fatalf("update changed CreatedAt: %v → %v", sv.CreatedAt, got2.CreatedAt)
	}
	// Upstream timeouts round-trip to the millisecond.
	got2.HeaderTimeout, got2.IdleTimeout, got2.RequestTimeout = 150*time.Millisecond, 5*time.Minute, time.Hour
	must(t, s.UpdateService(ctx, &got2))
	if got3, err := s.GetService(ctx, "openai"); err != nil || got3.HeaderTimeout != 150*time.Millisecond ||
		got3.IdleTimeout != 5*time.Minute || got3.RequestTimeout != time.Hour {
		t.Fatalf("timeouts after update: %+v, %v", got3, err)
	}

	must(t, s.DeleteService(ctx, "groq"))
	wantErr(t, "get deleted service", func() error { _, err := s.GetService(ctx, "groq"); return err }(), store.ErrNotFound)
}

func testKeys(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "openai")
	mkService(t, s, "exa")
	k := &store.Key{
		Service: "openai", Secret: "sk-abc123def456ghi789", Weight: 3, Priority: 2, RateLimitRPM: 30,
		MaxInFlight: 2, Labels: map[string]string{"tier": "pro"}, BalanceTotal: 5, BalanceUnit: "usd",
		AccountEmail: "user1@example.com",
	}
	keys := append([]*store.Key{k}, &store.Key{Service: "exa", Secret: "exa-key-1234567890"}, &store.Key{Service: "openai", Secret: "sk-second-key-0000"})
	must(t, s.CreateKeys(ctx, keys))
	for _, k := range keys {
		if !strings.HasPrefix(k.ID, "key_") {
			t.Fatalf("key id %q lacks key_ prefix", k.ID)
		}
		if k.Hint != k.Secret.Hint() {
			t.Fatalf("hint %q, want %q", k.Hint, k.Secret.Hint())
		}
		if k.Status != store.StatusActive {
			t.Fatalf("status %q, want active", k.Status)
		}
	}

	got, err := s.GetKey(ctx, k.ID)
	must(t, err)
	if got.Secret != k.Secret || got.Service != "openai" || got.Weight != 3 || got.Priority != 2 || got.RateLimitRPM != 30 ||
		got.MaxInFlight != 2 || got.Labels["tier"] != "pro" || got.BalanceTotal != 5 || got.BalanceUnit != "usd" ||
		got.AccountEmail != "user1@example.com" || got.Status != store.StatusActive || got.Hint != k.Hint {
		t.Fatalf("GetKey = %+v", got)
	}

	tests := []struct {
		service string
		want    int
	}{{"", 3}, {"openai", 2}, {"exa", 1}, {"nope", 0}}
	for _, tt := range tests {
		ks, err := s.Keys(ctx, tt.service)
		must(t, err)
		if len(ks) != tt.want {
			t.Fatalf("Keys(%q): %d keys, want %d", tt.service, len(ks), tt.want)
		}
		for _, kk := range ks {
			if kk.Secret.IsZero() || (tt.service != "" && kk.Service != tt.service) {
				t.Fatalf("Keys(%q) returned %+v", tt.service, kk)
			}
		}
	}

	// Update without a secret keeps it; with one replaces it.
	got.Weight, got.Labels, got.Secret = 7, map[string]string{"feature": "image-gen"}, ""
	must(t, s.UpdateKey(ctx, &got))
	after, err := s.GetKey(ctx, k.ID)
	must(t, err)
	if after.Weight != 7 || after.Labels["feature"] != "image-gen" || after.Secret != k.Secret {
		t.Fatalf("after update: %+v (secret kept: %v)", after, after.Secret == k.Secret)
	}
	after.Secret = "sk-new-value-99999999"
	must(t, s.UpdateKey(ctx, &after))
	after2, err := s.GetKey(ctx, k.ID)
	must(t, err)
	if after2.Secret != "sk-new-value-99999999" || after2.Hint != keypool.Secret("sk-new-value-99999999").Hint() {
		t.Fatalf("secret not replaced: hint %q", after2.Hint)
	}
	// Moving a key to another service keeps its secret.
	after2.Service, after2.Secret = "exa", ""
	must(t, s.UpdateKey(ctx, &after2))
	moved, err := s.GetKey(ctx, k.ID)
	must(t, err)
	if moved.Service != "exa" || moved.Secret != "sk-new-value-99999999" {
		t.Fatalf("moved key: service %q, secret kept %v", moved.Service, moved.Secret == "sk-new-value-99999999")
	}

	must(t, s.SetKeyStatus(ctx, k.ID, store.StatusInvalid, "401 from upstream"))
	must(t, s.AddKeySpend(ctx, k.ID, 1.25))
	must(t, s.AddKeySpend(ctx, k.ID, 0.5))
	st, err := s.GetKey(ctx, k.ID)
	must(t, err)
	if st.Status != store.StatusInvalid || st.StatusReason != "401 from upstream" || st.BalanceUsed != 1.75 || st.Weight != 7 {
		t.Fatalf("after status/spend: %+v", st)
	}
	wantErr(t, "bad status", s.SetKeyStatus(ctx, k.ID, "cooling", ""), store.ErrInvalid)

	must(t, s.DeleteKey(ctx, k.ID))
	_, err = s.GetKey(ctx, k.ID)
	wantErr(t, "get deleted key", err, store.ErrNotFound)
}

func testCreateKeysAllOrNothing(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "openai")
	mkKeys(t, s, "openai", "sk-existing-000000001")
	tests := []struct {
		name string
		keys []*store.Key
		want error
	}{
		{"duplicate within batch", []*store.Key{
			{Service: "openai", Secret: "sk-batch-dup-00000001"}, {Service: "openai", Secret: "sk-batch-dup-00000001"},
		}, store.ErrConflict},
		{"duplicate of existing", []*store.Key{
			{Service: "openai", Secret: "sk-fresh-000000000001"}, {Service: "openai", Secret: "sk-existing-000000001"},
		}, store.ErrConflict},
		{"unknown service", []*store.Key{
			{Service: "openai", Secret: "sk-fresh-000000000002"}, {Service: "nope", Secret: "sk-fresh-000000000003"},
		}, store.ErrInvalid},
		{"empty secret", []*store.Key{
			{Service: "openai", Secret: "sk-fresh-000000000004"}, {Service: "openai"},
		}, store.ErrInvalid},
		{"missing service", []*store.Key{
			{Service: "openai", Secret: "sk-fresh-000000000005"}, {Secret: "sk-fresh-000000000006"},
		}, store.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantErr(t, "CreateKeys", s.CreateKeys(ctx, tt.keys), tt.want)
			ks, err := s.Keys(ctx, "")
			must(t, err)
			if len(ks) != 1 {
				t.Fatalf("%d keys after a failed batch, want 1", len(ks))
			}
		})
	}
}

func testKeyValueUniquePerService(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "a")
	mkService(t, s, "b")
	mkKeys(t, s, "a", "shared-value-1234567")
	mkKeys(t, s, "b", "shared-value-1234567") // another service: fine
	err := s.CreateKeys(ctx, []*store.Key{{Service: "a", Secret: "shared-value-1234567"}})
	wantErr(t, "same value twice", err, store.ErrConflict)
	if strings.Contains(fmt.Sprint(err), "shared-value") {
		t.Fatalf("error reveals the key value: %v", err)
	}
	// Updating a key to another key's value conflicts too.
	ks := mkKeys(t, s, "a", "other-value-12345678")
	ks[0].Secret = "shared-value-1234567"
	wantErr(t, "update to existing value", s.UpdateKey(ctx, ks[0]), store.ErrConflict)
}

func testDeleteServiceCascades(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "a")
	mkService(t, s, "b")
	ka := mkKeys(t, s, "a", "value-a-1-0000000", "value-a-2-0000000")
	mkKeys(t, s, "b", "value-b-1-0000000")
	must(t, s.DeleteService(ctx, "a"))
	for _, k := range ka {
		_, err := s.GetKey(ctx, k.ID)
		wantErr(t, "key of deleted service", err, store.ErrNotFound)
	}
	ks, err := s.Keys(ctx, "")
	must(t, err)
	if len(ks) != 1 || ks[0].Service != "b" {
		t.Fatalf("keys left: %+v", ks)
	}
}

func testTeams(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	tm := store.Team{Name: "engineering", AllowedServices: []string{"openai"}, Limits: store.Limits{RPMLimit: 600, TPMLimit: 200000, DailyTokenLimit: 5000000}}
	must(t, s.CreateTeam(ctx, &tm))
	if !strings.HasPrefix(tm.ID, "team_") {
		t.Fatalf("team id %q lacks team_ prefix", tm.ID)
	}
	mkTeam(t, s, "alpha")
	got, err := s.GetTeam(ctx, tm.ID)
	must(t, err)
	if got.Name != "engineering" || got.RPMLimit != 600 || got.TPMLimit != 200000 || got.DailyTokenLimit != 5000000 ||
		!slices.Equal(got.AllowedServices, []string{"openai"}) {
		t.Fatalf("GetTeam = %+v", got)
	}
	list, err := s.ListTeams(ctx)
	must(t, err)
	if len(list) != 2 || list[0].Name != "alpha" {
		t.Fatalf("ListTeams = %+v", list)
	}
	wantErr(t, "duplicate team", s.CreateTeam(ctx, &store.Team{Name: "alpha"}), store.ErrConflict)
	wantErr(t, "empty name", s.CreateTeam(ctx, &store.Team{}), store.ErrInvalid)

	got.Name, got.RPMLimit = "eng", 10
	must(t, s.UpdateTeam(ctx, &got))
	got2, err := s.GetTeam(ctx, tm.ID)
	must(t, err)
	if got2.Name != "eng" || got2.RPMLimit != 10 || got2.TPMLimit != 200000 {
		t.Fatalf("after update: %+v", got2)
	}
	got2.Name = "alpha"
	wantErr(t, "rename to taken name", s.UpdateTeam(ctx, &got2), store.ErrConflict)
}

func testUsersAndTokens(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	a, b := mkTeam(t, s, "a"), mkTeam(t, s, "b")
	u := store.User{ExternalID: "alice@example.com", TeamID: a.ID}
	must(t, s.CreateUser(ctx, &u))
	if !strings.HasPrefix(u.ID, "user_") {
		t.Fatalf("user id %q lacks user_ prefix", u.ID)
	}
	wantErr(t, "duplicate external id", s.CreateUser(ctx, &store.User{ExternalID: "alice@example.com", TeamID: b.ID}), store.ErrConflict)
	wantErr(t, "unknown team", s.CreateUser(ctx, &store.User{ExternalID: "bob@example.com", TeamID: "team_nope"}), store.ErrInvalid)
	gu, err := s.GetUser(ctx, u.ID)
	must(t, err)
	if gu.ExternalID != "alice@example.com" || gu.TeamID != a.ID {
		t.Fatalf("GetUser = %+v", gu)
	}
	must(t, s.CreateUser(ctx, &store.User{ExternalID: "carol@example.com", TeamID: b.ID}))
	for _, tc := range []struct {
		team string
		want int
	}{{"", 2}, {a.ID, 1}, {b.ID, 1}} {
		us, err := s.ListUsers(ctx, tc.team)
		must(t, err)
		if len(us) != tc.want {
			t.Fatalf("ListUsers(%q) = %d, want %d", tc.team, len(us), tc.want)
		}
	}

	exp := time.Now().Add(24 * time.Hour).UTC().Truncate(time.Second)
	tok := store.Token{Name: "dev-laptop", TeamID: a.ID, Prefix: "kp_abcd", Hash: []byte("hash-1-0123456789abcdef0123456789"),
		Scopes: []string{"lease"}, ExpiresAt: &exp, IsActive: true, Limits: store.Limits{RPMLimit: 5}}
	must(t, s.CreateToken(ctx, &tok))
	if !strings.HasPrefix(tok.ID, "tok_") {
		t.Fatalf("token id %q lacks tok_ prefix", tok.ID)
	}
	userTok := store.Token{Name: "alice", UserID: u.ID, Prefix: "kp_efgh", Hash: []byte("hash-2-0123456789abcdef0123456789"), IsActive: true}
	must(t, s.CreateToken(ctx, &userTok))
	if userTok.TeamID != a.ID {
		t.Fatalf("user token team = %q, want the user's team %q", userTok.TeamID, a.ID)
	}
	wantErr(t, "duplicate hash", s.CreateToken(ctx, &store.Token{TeamID: b.ID, Hash: tok.Hash}), store.ErrConflict)
	wantErr(t, "user of another team", s.CreateToken(ctx, &store.Token{TeamID: b.ID, UserID: u.ID, Hash: []byte("h3")}), store.ErrInvalid)
	wantErr(t, "unknown team", s.CreateToken(ctx, &store.Token{TeamID: "team_nope", Hash: []byte("h4")}), store.ErrInvalid)
	wantErr(t, "no hash", s.CreateToken(ctx, &store.Token{TeamID: a.ID}), store.ErrInvalid)

	got, err := s.GetTokenByHash(ctx, tok.Hash)
	must(t, err)
	if got.ID != tok.ID || got.Name != "dev-laptop" || got.Prefix != "kp_abcd" || !got.IsActive || got.RPMLimit != 5 ||
		!slices.Equal(got.Scopes, []string{"lease"}) || got.ExpiresAt == nil || !got.ExpiresAt.Equal(exp) || got.UserID != "" {
		t.Fatalf("GetTokenByHash = %+v", got)
	}
	_, err = s.GetTokenByHash(ctx, []byte("nope"))
	wantErr(t, "unknown hash", err, store.ErrNotFound)

	used := time.Now().UTC().Truncate(time.Second)
	got.IsActive, got.LastUsedAt, got.Name, got.ExpiresAt = false, &used, "renamed", nil
	must(t, s.UpdateToken(ctx, &got))
	got2, err := s.GetToken(ctx, tok.ID)
	must(t, err)
	if got2.IsActive || got2.Name != "renamed" || got2.LastUsedAt == nil || !got2.LastUsedAt.Equal(used) || got2.ExpiresAt != nil {
		t.Fatalf("after update: %+v", got2)
	}
	gu2, err := s.GetToken(ctx, userTok.ID)
	must(t, err)
	if gu2.UserID != u.ID {
		t.Fatalf("user token user = %q", gu2.UserID)
	}
	ts, err := s.ListTokens(ctx, a.ID)
	must(t, err)
	if len(ts) != 2 {
		t.Fatalf("ListTokens(a) = %d, want 2", len(ts))
	}

	// Moving a user moves its tokens.
	gu.TeamID = b.ID
	must(t, s.UpdateUser(ctx, &gu))
	gu3, err := s.GetToken(ctx, userTok.ID)
	must(t, err)
	if gu3.TeamID != b.ID {
		t.Fatalf("user token team after move = %q, want %q", gu3.TeamID, b.ID)
	}

	must(t, s.DeleteToken(ctx, tok.ID))
	_, err = s.GetToken(ctx, tok.ID)
	wantErr(t, "deleted token", err, store.ErrNotFound)
}

func testDeleteTeamCascades(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	a, b := mkTeam(t, s, "a"), mkTeam(t, s, "b")
	u := store.User{ExternalID: "alice", TeamID: a.ID}
	must(t, s.CreateUser(ctx, &u))
	t1 := store.Token{TeamID: a.ID, Hash: []byte("t1"), IsActive: true}
	t2 := store.Token{UserID: u.ID, Hash: []byte("t2"), IsActive: true}
	t3 := store.Token{TeamID: b.ID, Hash: []byte("t3"), IsActive: true}
	for _, tk := range []*store.Token{&t1, &t2, &t3} {
		must(t, s.CreateToken(ctx, tk))
	}
	must(t, s.DeleteTeam(ctx, a.ID))
	_, err := s.GetUser(ctx, u.ID)
	wantErr(t, "user of deleted team", err, store.ErrNotFound)
	for _, id := range []string{t1.ID, t2.ID} {
		_, err := s.GetToken(ctx, id)
		wantErr(t, "token of deleted team", err, store.ErrNotFound)
	}
	_, err = s.GetToken(ctx, t3.ID)
	must(t, err)
	_, err = s.GetTeam(ctx, b.ID)
	must(t, err)
}

func testDeleteUserCascades(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	a := mkTeam(t, s, "a")
	u := store.User{ExternalID: "alice", TeamID: a.ID}
	must(t, s.CreateUser(ctx, &u))
	ut := store.Token{UserID: u.ID, Hash: []byte("u"), IsActive: true}
	tt := store.Token{TeamID: a.ID, Hash: []byte("t"), IsActive: true}
	must(t, s.CreateToken(ctx, &ut))
	must(t, s.CreateToken(ctx, &tt))
	must(t, s.DeleteUser(ctx, u.ID))
	_, err := s.GetToken(ctx, ut.ID)
	wantErr(t, "token of deleted user", err, store.ErrNotFound)
	_, err = s.GetToken(ctx, tt.ID)
	must(t, err)
}

func testNotFound(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "svc")
	team := mkTeam(t, s, "team")
	tests := []struct {
		name string
		call func() error
	}{
		{"GetService", func() error { _, err := s.GetService(ctx, "nope"); return err }},
		{"UpdateService", func() error { return s.UpdateService(ctx, &store.Service{Name: "nope"}) }},
		{"DeleteService", func() error { return s.DeleteService(ctx, "nope") }},
		{"GetKey", func() error { _, err := s.GetKey(ctx, "key_nope"); return err }},
		{"UpdateKey", func() error { return s.UpdateKey(ctx, &store.Key{ID: "key_nope", Service: "svc"}) }},
		{"SetKeyStatus", func() error { return s.SetKeyStatus(ctx, "key_nope", store.StatusDisabled, "") }},
		{"AddKeySpend", func() error { return s.AddKeySpend(ctx, "key_nope", 1) }},
		{"DeleteKey", func() error { return s.DeleteKey(ctx, "key_nope") }},
		{"GetTeam", func() error { _, err := s.GetTeam(ctx, "team_nope"); return err }},
		{"UpdateTeam", func() error { return s.UpdateTeam(ctx, &store.Team{ID: "team_nope", Name: "x"}) }},
		{"DeleteTeam", func() error { return s.DeleteTeam(ctx, "team_nope") }},
		{"GetUser", func() error { _, err := s.GetUser(ctx, "user_nope"); return err }},
		{"UpdateUser", func() error {
			return s.UpdateUser(ctx, &store.User{ID: "user_nope", ExternalID: "x", TeamID: team.ID})
		}},
		{"DeleteUser", func() error { return s.DeleteUser(ctx, "user_nope") }},
		{"GetToken", func() error { _, err := s.GetToken(ctx, "tok_nope"); return err }},
		{"UpdateToken", func() error { return s.UpdateToken(ctx, &store.Token{ID: "tok_nope"}) }},
		{"DeleteToken", func() error { return s.DeleteToken(ctx, "tok_nope") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantErr(t, tt.name, tt.call(), store.ErrNotFound)
		})
	}
}

func testVersion(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	version := func() string {
		t.Helper()
		v, err := s.Version(ctx)
		must(t, err)
		return v
	}
	var keyID, teamID string
	tests := []struct {
		name    string
		changes bool
		op      func() error
	}{
		{"CreateService", true, func() error { return s.CreateService(ctx, &store.Service{Name: "svc", BaseURL: "https://x"}) }},
		{"UpdateService", true, func() error { return s.UpdateService(ctx, &store.Service{Name: "svc", BaseURL: "https://y"}) }},
		{"CreateKeys", true, func() error {
			ks := []*store.Key{{Service: "svc", Secret: "value-000000000001"}}
			err := s.CreateKeys(ctx, ks)
			keyID = ks[0].ID
			return err
		}},
		{"UpdateKey", true, func() error {
			return s.UpdateKey(ctx, &store.Key{ID: keyID, Service: "svc", Weight: 2, Status: store.StatusActive})
		}},
		{"SetKeyStatus", true, func() error { return s.SetKeyStatus(ctx, keyID, store.StatusDisabled, "admin") }},
		{"reads", false, func() error {
			if _, err := s.Services(ctx); err != nil {
				return err
			}
			if _, err := s.Keys(ctx, ""); err != nil {
				return err
			}
			_, err := s.GetKey(ctx, keyID)
			return err
		}},
		{"team writes", false, func() error {
			tm := store.Team{Name: "t"}
			if err := s.CreateTeam(ctx, &tm); err != nil {
				return err
			}
			teamID = tm.ID
			return s.CreateToken(ctx, &store.Token{TeamID: teamID, Hash: []byte("h")})
		}},
		{"usage", false, func() error {
			return s.AppendUsage(ctx, []store.UsageRecord{{Time: time.Now(), Service: "svc", KeyID: keyID, Status: 200}})
		}},
		{"failed write", false, func() error {
			err := s.CreateService(ctx, &store.Service{Name: "svc"})
			if errors.Is(err, store.ErrConflict) {
				return nil
			}
			return fmt.Errorf("want conflict, got %v", err)
		}},
		{"DeleteKey", true, func() error { return s.DeleteKey(ctx, keyID) }},
		{"DeleteService", true, func() error { return s.DeleteService(ctx, "svc") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := version()
			must(t, tt.op())
			after := version()
			if (before != after) != tt.changes {
				t.Fatalf("version %q → %q, want changed=%v", before, after, tt.changes)
			}
		})
	}
}

func testConcurrentWriters(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	mkService(t, s, "svc")
	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, 3*n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.CreateKeys(ctx, []*store.Key{{Service: "svc", Secret: keypool.Secret(fmt.Sprintf("concurrent-key-%04d", i))}}); err != nil {
				errs <- fmt.Errorf("CreateKeys %d: %w", i, err)
			}
			if err := s.CreateTeam(ctx, &store.Team{Name: fmt.Sprintf("team-%04d", i)}); err != nil {
				errs <- fmt.Errorf("CreateTeam %d: %w", i, err)
			}
			if err := s.AppendUsage(ctx, []store.UsageRecord{{Time: time.Now(), Service: "svc", Status: 200}}); err != nil {
				errs <- fmt.Errorf("AppendUsage %d: %w", i, err)
			}
			if _, err := s.Keys(ctx, "svc"); err != nil {
				errs <- fmt.Errorf("Keys %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	ks, err := s.Keys(ctx, "svc")
	must(t, err)
	teams, err := s.ListTeams(ctx)
	must(t, err)
	if len(ks) != n || len(teams) != n {
		t.Fatalf("%d keys and %d teams, want %d each", len(ks), len(teams), n)
	}
}

func day(d int, hour int) time.Time {
	return time.Date(2025, 3, d, hour, 30, 0, 0, time.UTC)
}

func usageFixture(t *testing.T, s store.Store) {
	t.Helper()
	recs := []store.UsageRecord{
		{Time: day(1, 0), TeamID: "team_a", TokenID: "tok_a", Service: "openai", KeyID: "key_1", Model: "gpt-4o", Status: 200, TokensIn: 10, TokensOut: 20, Cost: 0.5},
		{Time: day(1, 23), TeamID: "team_a", TokenID: "tok_a", Service: "openai", KeyID: "key_2", Model: "gpt-4o-mini", Status: 200, TokensIn: 1, TokensOut: 2, Cost: 0.25},
		{Time: day(2, 12), TeamID: "team_a", TokenID: "tok_b", Service: "groq", KeyID: "key_3", Model: "llama", Status: 429, TokensIn: 5, TokensOut: 0, Cost: 0},
		{Time: day(2, 13), TeamID: "team_b", TokenID: "tok_c", Service: "openai", KeyID: "key_1", Model: "gpt-4o", Status: 200, TokensIn: 100, TokensOut: 200, Cost: 2},
		{Time: day(3, 1), TeamID: "team_b", TokenID: "tok_c", Service: "exa", KeyID: "key_4", Status: 200, Cost: 0.125},
	}
	must(t, s.AppendUsage(ctxT(t), recs))
}

func testUsage(t *testing.T, s store.Store) {
	usageFixture(t, s)
	type row struct {
		group                   string // "dim=value,dim=value"
		requests, tokIn, tokOut int64
		cost                    float64
	}
	tests := []struct {
		name string
		q    store.UsageQuery
		want []row
	}{
		{"total", store.UsageQuery{}, []row{{"", 5, 116, 222, 2.875}}},
		{"by team", store.UsageQuery{GroupBy: []string{store.GroupTeam}}, []row{
			{"team=team_a", 3, 16, 22, 0.75}, {"team=team_b", 2, 100, 200, 2.125}}},
		{"by token", store.UsageQuery{GroupBy: []string{store.GroupToken}}, []row{
			{"token=tok_a", 2, 11, 22, 0.75}, {"token=tok_b", 1, 5, 0, 0}, {"token=tok_c", 2, 100, 200, 2.125}}},
		{"by service", store.UsageQuery{GroupBy: []string{store.GroupService}}, []row{
			{"service=exa", 1, 0, 0, 0.125}, {"service=groq", 1, 5, 0, 0}, {"service=openai", 3, 111, 222, 2.75}}},
		{"by key", store.UsageQuery{GroupBy: []string{store.GroupKey}}, []row{
			{"key=key_1", 2, 110, 220, 2.5}, {"key=key_2", 1, 1, 2, 0.25}, {"key=key_3", 1, 5, 0, 0}, {"key=key_4", 1, 0, 0, 0.125}}},
		{"by model", store.UsageQuery{GroupBy: []string{store.GroupModel}}, []row{
			{"model=", 1, 0, 0, 0.125}, {"model=gpt-4o", 2, 110, 220, 2.5}, {"model=gpt-4o-mini", 1, 1, 2, 0.25}, {"model=llama", 1, 5, 0, 0}}},
		{"by day", store.UsageQuery{GroupBy: []string{store.GroupDay}}, []row{
			{"day=2025-03-01", 2, 11, 22, 0.75}, {"day=2025-03-02", 2, 105, 200, 2}, {"day=2025-03-03", 1, 0, 0, 0.125}}},
		{"by team and day", store.UsageQuery{GroupBy: []string{store.GroupTeam, store.GroupDay}}, []row{
			{"team=team_a,day=2025-03-01", 2, 11, 22, 0.75}, {"team=team_a,day=2025-03-02", 1, 5, 0, 0},
			{"team=team_b,day=2025-03-02", 1, 100, 200, 2}, {"team=team_b,day=2025-03-03", 1, 0, 0, 0.125}}},
		{"filter team", store.UsageQuery{Team: "team_b"}, []row{{"", 2, 100, 200, 2.125}}},
		{"filter token", store.UsageQuery{Token: "tok_b"}, []row{{"", 1, 5, 0, 0}}},
		{"filter service by key", store.UsageQuery{Service: "openai", GroupBy: []string{store.GroupKey}}, []row{
			{"key=key_1", 2, 110, 220, 2.5}, {"key=key_2", 1, 1, 2, 0.25}}},
		{"filter key", store.UsageQuery{Key: "key_1"}, []row{{"", 2, 110, 220, 2.5}}},
		{"filter model", store.UsageQuery{Model: "gpt-4o"}, []row{{"", 2, 110, 220, 2.5}}},
		{"since inclusive until exclusive", store.UsageQuery{Since: day(1, 23), Until: day(2, 13), GroupBy: []string{store.GroupDay}}, []row{
			{"day=2025-03-01", 1, 1, 2, 0.25}, {"day=2025-03-02", 1, 5, 0, 0}}},
		{"no match", store.UsageQuery{Team: "team_nope"}, nil},
		{"no match grouped", store.UsageQuery{Team: "team_nope", GroupBy: []string{store.GroupDay}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rows, err := s.QueryUsage(ctxT(t), tt.q)
			must(t, err)
			var got []row
			for _, r := range rows {
				var g []string
				for _, dim := range tt.q.GroupBy {
					g = append(g, dim+"="+r.Group[dim])
				}
				got = append(got, row{strings.Join(g, ","), r.Requests, r.TokensIn, r.TokensOut, r.Cost})
			}
			slices.SortFunc(got, func(a, b row) int { return strings.Compare(a.group, b.group) })
			if !slices.Equal(got, tt.want) {
				t.Fatalf("QueryUsage(%+v)\n got %+v\nwant %+v", tt.q, got, tt.want)
			}
		})
	}
	t.Run("unknown group", func(t *testing.T) {
		_, err := s.QueryUsage(ctxT(t), store.UsageQuery{GroupBy: []string{"nope"}})
		wantErr(t, "unknown group", err, store.ErrInvalid)
	})
}

func testPruneUsage(t *testing.T, s store.Store) {
	ctx := ctxT(t)
	usageFixture(t, s)
	n, err := s.PruneUsage(ctx, day(2, 13))
	must(t, err)
	if n != 3 {
		t.Fatalf("pruned %d, want 3", n)
	}
	rows, err := s.QueryUsage(ctx, store.UsageQuery{})
	must(t, err)
	if len(rows) != 1 || rows[0].Requests != 2 {
		t.Fatalf("after prune: %+v", rows)
	}
	n, err = s.PruneUsage(ctx, day(1, 0))
	must(t, err)
	if n != 0 {
		t.Fatalf("second prune deleted %d, want 0", n)
	}
}
