package storetest

import (
	"errors"
	"testing"
	"time"

	"github.com/keypool/keypool/store"
)

// adminStore returns s as a [store.AdminStore], or skips the test when s
// does not keep admin users.
func adminStore(t *testing.T, s store.Store) store.AdminStore {
	t.Helper()
	as, ok := s.(store.AdminStore)
	if !ok {
		t.Skip("store does not implement store.AdminStore")
	}
	return as
}

func testAdminUsers(t *testing.T, s store.Store) {
	as, ctx := adminStore(t, s), ctxT(t)
	u := store.AdminUser{Username: "alice", PasswordHash: "$argon2id$x", Role: store.RoleAdmin}
	must(t, as.CreateAdminUser(ctx, &u))
	if u.ID == "" || u.CreatedAt.IsZero() {
		t.Fatalf("created user has no id or time: %+v", u)
	}
	dup := store.AdminUser{Username: "alice", PasswordHash: "h", Role: store.RoleViewer}
	wantErr(t, "duplicate username", as.CreateAdminUser(ctx, &dup), store.ErrConflict)
	bad := store.AdminUser{Username: "bob", PasswordHash: "h", Role: "root"}
	wantErr(t, "unknown role", as.CreateAdminUser(ctx, &bad), store.ErrInvalid)
	v := store.AdminUser{Username: "bob", PasswordHash: "h", Role: store.RoleViewer}
	must(t, as.CreateAdminUser(ctx, &v))

	got, err := as.GetAdminUserByName(ctx, "alice")
	must(t, err)
	if got.ID != u.ID || got.PasswordHash != u.PasswordHash || got.Role != store.RoleAdmin || got.Disabled {
		t.Fatalf("GetAdminUserByName = %+v, want %+v", got, u)
	}
	_, err = as.GetAdminUserByName(ctx, "nobody")
	wantErr(t, "unknown username", err, store.ErrNotFound)

	now := time.Now().UTC().Truncate(time.Second)
	got.Disabled, got.PasswordHash, got.LastLoginAt = true, "$argon2id$y", &now
	must(t, as.UpdateAdminUser(ctx, &got))
	again, err := as.GetAdminUser(ctx, u.ID)
	must(t, err)
	if !again.Disabled || again.PasswordHash != "$argon2id$y" || again.LastLoginAt == nil || !again.LastLoginAt.Equal(now) {
		t.Fatalf("after update = %+v", again)
	}
	list, err := as.ListAdminUsers(ctx)
	must(t, err)
	if len(list) != 2 || list[0].Username != "alice" || list[1].Username != "bob" {
		t.Fatalf("ListAdminUsers = %+v, want alice, bob", list)
	}
	must(t, as.DeleteAdminUser(ctx, v.ID))
	wantErr(t, "delete again", as.DeleteAdminUser(ctx, v.ID), store.ErrNotFound)
	missing := store.AdminUser{ID: "adm_missing", Username: "x", PasswordHash: "h", Role: store.RoleAdmin}
	wantErr(t, "update missing", as.UpdateAdminUser(ctx, &missing), store.ErrNotFound)
}

func testSessions(t *testing.T, s store.Store) {
	as, ctx := adminStore(t, s), ctxT(t)
	u := store.AdminUser{Username: "alice", PasswordHash: "h", Role: store.RoleAdmin}
	must(t, as.CreateAdminUser(ctx, &u))
	other := store.AdminUser{Username: "carol", PasswordHash: "h", Role: store.RoleViewer}
	must(t, as.CreateAdminUser(ctx, &other))
	now := time.Now().UTC().Truncate(time.Second)
	mk := func(b byte, user string, exp time.Time) []byte {
		h := make([]byte, 32)
		h[0] = b
		must(t, as.CreateSession(ctx, &store.Session{Hash: h, UserID: user, Addr: "127.0.0.1", ExpiresAt: exp}))
		return h
	}
	h1 := mk(1, u.ID, now.Add(time.Hour))
	h2 := mk(2, u.ID, now.Add(time.Hour))
	h3 := mk(3, other.ID, now.Add(-time.Minute))
	wantErr(t, "session of a missing user", as.CreateSession(ctx, &store.Session{Hash: []byte{9}, UserID: "adm_missing", ExpiresAt: now}), store.ErrInvalid)

	got, err := as.GetSession(ctx, h1)
	must(t, err)
	if got.UserID != u.ID || !got.ExpiresAt.Equal(now.Add(time.Hour)) {
		t.Fatalf("GetSession = %+v", got)
	}
	n, err := as.PruneSessions(ctx, now)
	must(t, err)
	if n != 1 {
		t.Fatalf("PruneSessions removed %d, want 1 (the expired one)", n)
	}
	_, err = as.GetSession(ctx, h3)
	wantErr(t, "pruned session", err, store.ErrNotFound)

	must(t, as.DeleteSession(ctx, h1))
	_, err = as.GetSession(ctx, h1)
	wantErr(t, "deleted session", err, store.ErrNotFound)
	mk(4, u.ID, now.Add(time.Hour))
	n, err = as.DeleteUserSessions(ctx, u.ID)
	must(t, err)
	if n != 2 {
		t.Fatalf("DeleteUserSessions removed %d, want 2", n)
	}
	_, err = as.GetSession(ctx, h2)
	wantErr(t, "session of a signed-out user", err, store.ErrNotFound)

	h5 := mk(5, other.ID, now.Add(time.Hour))
	must(t, as.DeleteAdminUser(ctx, other.ID))
	if _, err := as.GetSession(ctx, h5); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("session of a deleted user: err = %v, want not found", err)
	}
}

func testAudit(t *testing.T, s store.Store) {
	as, ctx := adminStore(t, s), ctxT(t)
	base := time.Now().UTC().Truncate(time.Second).Add(-time.Hour)
	for i, a := range []string{"service.create", "key.create", "token.create", "service.delete"} {
		e := store.AuditEntry{Time: base.Add(time.Duration(i) * time.Minute), Actor: "alice", Action: a, Target: "t" + a, Addr: "10.0.0.1", Status: 201}
		must(t, as.AppendAudit(ctx, &e))
		if e.ID == 0 {
			t.Fatal("AppendAudit assigned no id")
		}
	}
	all, err := as.ListAudit(ctx, store.AuditQuery{})
	must(t, err)
	if len(all) != 4 || all[0].Action != "service.delete" || all[3].Action != "service.create" {
		t.Fatalf("ListAudit = %+v, want 4 newest first", all)
	}
	if all[0].Actor != "alice" || all[0].Addr != "10.0.0.1" || all[0].Status != 201 || !all[0].Time.Equal(base.Add(3*time.Minute)) {
		t.Fatalf("entry = %+v", all[0])
	}
	some, err := as.ListAudit(ctx, store.AuditQuery{Action: "key.create"})
	must(t, err)
	if len(some) != 1 || some[0].Target != "tkey.create" {
		t.Fatalf("filtered = %+v", some)
	}
	lim, err := as.ListAudit(ctx, store.AuditQuery{Limit: 2, Since: base.Add(time.Minute)})
	must(t, err)
	if len(lim) != 2 || lim[1].Action != "token.create" {
		t.Fatalf("limited = %+v", lim)
	}
	n, err := as.PruneAudit(ctx, base.Add(2*time.Minute))
	must(t, err)
	if n != 2 {
		t.Fatalf("PruneAudit removed %d, want 2", n)
	}
}

func testUsageStatusCounts(t *testing.T, s store.Store) {
	sc, ok := s.(store.StatusCounter)
	if !ok {
		t.Skip("store does not implement store.StatusCounter")
	}
	ctx := ctxT(t)
	now := time.Now().UTC()
	recs := []store.UsageRecord{
		{Time: now.Add(-2 * time.Hour), Service: "a", Status: 429}, // too old
		{Time: now.Add(-time.Minute), Service: "a", Status: 200},
		{Time: now.Add(-time.Minute), Service: "a", Status: 429},
		{Time: now.Add(-time.Minute), Service: "a", Status: 502},
		{Time: now.Add(-time.Minute), Service: "a", Status: 0},
		{Time: now.Add(-time.Minute), Service: "b", Status: 200},
	}
	must(t, s.AppendUsage(ctx, recs))
	got, err := sc.UsageStatusCounts(ctx, now.Add(-time.Hour))
	must(t, err)
	if got["a"] != (store.StatusCounts{Requests: 4, RateLimited: 1, Errors: 2}) || got["b"] != (store.StatusCounts{Requests: 1}) {
		t.Fatalf("UsageStatusCounts = %+v", got)
	}
}
