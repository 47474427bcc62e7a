package server_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
)

// errCode returns the code of a JSON error body.
func errCode(m map[string]any) string {
	e, _ := m["error"].(map[string]any)
	c, _ := e["code"].(string)
	return c
}

// Issue 16 item 2: team B's lease-scoped token took team A's keys out of
// rotation with reports on key ids it read from X-Keypool-Key-Id. A
// report now needs the lease it reports on, from the token that took it,
// before the lease expires, once.
func TestReportNeedsLease(t *testing.T) {
	up := newUpstream(t, okJSON)
	clk := &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	k := startKP(t, withClock(clk), func(c *server.Config) { c.LeaseTTL = server.Duration(time.Minute) })
	k.addService("exa", up.URL, "x-api-key", nil)
	ids := []string{k.addKey("exa", keyA, nil), k.addKey("exa", keyB, nil), k.addKey("exa", keyC, nil)}
	teamA, teamB := k.addTeam("a", nil), k.addTeam("b", nil)
	tokA := k.addToken(teamA, map[string]any{"scopes": []string{"lease"}})
	tokB := k.addToken(teamB, map[string]any{"scopes": []string{"lease"}})
	tokB2 := k.addToken(teamB, map[string]any{"scopes": []string{"lease"}})
	limited := k.addToken(k.addTeam("limited", map[string]any{"allowed_services": []string{"other"}}),
		map[string]any{"scopes": []string{"lease"}})

	states := func() map[string]string {
		st, _ := k.srv.Pool().Stats("exa")
		m := map[string]string{}
		for _, s := range st {
			m[s.ID] = s.State.String()
		}
		return m
	}
	lease := func(tok string) (keyID, leaseID string) {
		t.Helper()
		code, m, _ := k.do("GET", "/key?service=exa", tok, nil)
		keyID, _ = m["key_id"].(string)
		leaseID, _ = m["lease_id"].(string)
		if code != 200 || keyID == "" || len(leaseID) < 20 || m["expires_at"] == nil {
			t.Fatalf("lease: %d %v", code, m)
		}
		return keyID, leaseID
	}

	// The attack: reports on every key id without a lease.
	for _, id := range ids {
		code, m, _ := k.do("POST", "/key/"+id+"/report", tokB, map[string]any{"outcome": "invalid"})
		if code != http.StatusBadRequest || errCode(m) != "bad_request" {
			t.Errorf("report without a lease: %d %v, want 400 bad_request", code, m)
		}
	}
	for id, s := range states() {
		if s != "active" {
			t.Fatalf("key %s is %s after reports without a lease", id, s)
		}
	}

	keyA1, leaseA1 := lease(tokA)
	for _, tc := range []struct {
		name   string
		tok    string
		key    string
		body   map[string]any
		status int
		code   string
	}{
		{"unknown lease", tokB, keyA1, map[string]any{"outcome": "invalid", "lease_id": "kl_" + strings.Repeat("0", 32)}, 404, "lease_not_found"},
		{"another team's lease", tokB, keyA1, map[string]any{"outcome": "invalid", "lease_id": leaseA1}, 403, "forbidden"},
		{"another key", tokA, ids[0] + ids[1], map[string]any{"outcome": "invalid", "lease_id": leaseA1}, 404, "lease_not_found"},
		{"team without the service", limited, keyA1, map[string]any{"outcome": "invalid", "lease_id": leaseA1}, 403, "forbidden"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, m, _ := k.do("POST", "/key/"+tc.key+"/report", tc.tok, tc.body)
			if code != tc.status || errCode(m) != tc.code {
				t.Errorf("%d %v, want %d %s", code, m, tc.status, tc.code)
			}
		})
	}
	if s := states()[keyA1]; s != "active" {
		t.Fatalf("key %s is %s after refused reports", keyA1, s)
	}
	if code, m, _ := k.do("GET", "/key?service=exa", limited, nil); code != 403 {
		t.Errorf("lease on a service the team may not use: %d %v, want 403", code, m)
	}

	// The holder reports once.
	code, m, _ := k.do("POST", "/key/"+keyA1+"/report", tokA, map[string]any{"outcome": "rate_limited", "retry_after": 30, "lease_id": leaseA1})
	if code != 200 || m["state"] != "cooling" {
		t.Fatalf("holder's report: %d %v", code, m)
	}
	code, m, _ = k.do("POST", "/key/"+keyA1+"/report", tokA, map[string]any{"outcome": "invalid", "lease_id": leaseA1})
	if code != http.StatusConflict || errCode(m) != "lease_reported" {
		t.Fatalf("second report on a lease: %d %v, want 409 lease_reported", code, m)
	}

	// Another token of the same team is not the holder either.
	keyB1, leaseB1 := lease(tokB)
	if code, m, _ := k.do("POST", "/key/"+keyB1+"/report", tokB2, map[string]any{"outcome": "invalid", "lease_id": leaseB1}); code != 403 {
		t.Fatalf("report with a teammate's lease: %d %v, want 403", code, m)
	}
	// An expired lease reports nothing.
	clk.Set(clk.Now().Add(61 * time.Second))
	code, m, _ = k.do("POST", "/key/"+keyB1+"/report", tokB, map[string]any{"outcome": "invalid", "lease_id": leaseB1})
	if code != http.StatusGone || errCode(m) != "lease_expired" {
		t.Fatalf("report on an expired lease: %d %v, want 410 lease_expired", code, m)
	}
	if s := states()[keyB1]; s != "active" {
		t.Fatalf("key %s is %s after a report on an expired lease", keyB1, s)
	}

	// The admin reports on any key, lease or not.
	if code, m, _ := k.do("POST", "/key/"+ids[2]+"/report", k.admin, map[string]any{"outcome": "invalid"}); code != 200 || m["state"] != "invalid" {
		t.Fatalf("admin report without a lease: %d %v", code, m)
	}
	k.checkLogs()
}

// The README documents "refused" among the report outcomes: a lease holder
// reports an ambiguous refusal (a bare 403), one strike against the key.
func TestReportRefused(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("exa", up.URL, "x-api-key", nil)
	k.addKey("exa", keyA, nil)
	tok := k.addToken(k.addTeam("a", nil), map[string]any{"scopes": []string{"lease"}})
	code, m, _ := k.do("GET", "/key?service=exa", tok, nil)
	if code != 200 {
		t.Fatalf("lease: %d %v", code, m)
	}
	keyID, leaseID := m["key_id"].(string), m["lease_id"].(string)
	code, m, _ = k.do("POST", "/key/"+keyID+"/report", tok, map[string]any{"outcome": "refused", "lease_id": leaseID})
	if code != 200 || m["outcome"] != "refused" || m["state"] != "active" {
		t.Fatalf("refused report: %d %v, want 200, the key still active", code, m)
	}
	st, _ := k.srv.Pool().Stats("exa")
	if len(st) != 1 || st[0].Refusals != 1 {
		t.Fatalf("stats %+v, want one strike", st)
	}
	k.checkLogs()
}

// A lease holder's word is not the upstream's: one team's token that
// leased every key of a shared service and reported each "invalid" took
// the whole pool out of rotation for every team ("4 keys: 4 invalid").
// A client token's report that takes a key out for long (invalid;
// exhausted, even with a reset of up to 24 h) is now an ambiguous refusal: confirmed by ConfirmRefusals reports from
// distinct leases, and never below the service's MinActiveKeys floor.
func TestLeaseReportsKeepFloor(t *testing.T) {
	for _, tc := range []struct {
		outcome string
		retry   any
	}{{"invalid", nil}, {"exhausted", nil}, {"exhausted", 604800}} {
		outcome := tc.outcome
		t.Run(fmt.Sprint(outcome, tc.retry), func(t *testing.T) {
			up := newUpstream(t, okJSON)
			k := startKP(t)
			k.addService("exa", up.URL, "x-api-key", nil)
			for _, v := range []string{keyA, keyB, keyC, keyA + "4"} {
				k.addKey("exa", v, nil)
			}
			tok := k.addToken(k.addTeam("b", nil), map[string]any{"scopes": []string{"lease"}})
			for range 12 {
				code, m, _ := k.do("GET", "/key?service=exa", tok, nil)
				if code != 200 {
					t.Fatalf("lease: %d %v", code, m)
				}
				keyID, leaseID := m["key_id"].(string), m["lease_id"].(string)
				if code, m, _ := k.do("POST", "/key/"+keyID+"/report", tok, map[string]any{"outcome": outcome, "lease_id": leaseID, "retry_after": tc.retry}); code != 200 {
					t.Fatalf("report: %d %v", code, m)
				}
			}
			st, _ := k.srv.Pool().Stats("exa")
			active, out := 0, 0
			for _, s := range st {
				switch s.State.String() {
				case "active":
					active++
				case "invalid", "exhausted":
					out++
				}
			}
			if active < 2 || out == 0 {
				t.Fatalf("after 12 %q reports from one token: %d active, %d out (floor 2; confirmed keys should leave): %+v", outcome, active, out, st)
			}
			// The admin's report is applied as it is.
			if code, m, _ := k.do("POST", "/key/"+st[0].ID+"/report", k.admin, map[string]any{"outcome": "invalid"}); code != 200 || m["state"] != "invalid" {
				t.Fatalf("admin report: %d %v", code, m)
			}
			k.checkLogs()
		})
	}
}

// TestClientRateLimitReportsCoolAMinute: a lease token that reports
// rate_limited with a day-long retry_after cools the key for a minute at
// most, so one token cannot keep a shared pool cooling for the
// Retry-After cap; the admin's report is applied as it is.
func TestClientRateLimitReportsCoolAMinute(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("exa", up.URL, "x-api-key", nil)
	k.addKey("exa", keyA, nil)
	k.addKey("exa", keyB, nil)
	tok := k.addToken(k.addTeam("b", nil), map[string]any{"scopes": []string{"lease"}})
	code, m, _ := k.do("GET", "/key?service=exa", tok, nil)
	if code != 200 {
		t.Fatalf("lease: %d %v", code, m)
	}
	keyID, leaseID := m["key_id"].(string), m["lease_id"].(string)
	before := time.Now()
	if code, m, _ := k.do("POST", "/key/"+keyID+"/report", tok, map[string]any{"outcome": "rate_limited", "lease_id": leaseID, "retry_after": 86400}); code != 200 {
		t.Fatalf("report: %d %v", code, m)
	}
	answered := time.Now()
	until := func(id string) time.Time {
		st, _ := k.srv.Pool().Stats("exa")
		for _, s := range st {
			if s.ID == id {
				return s.Until
			}
		}
		t.Fatalf("no key %s", id)
		return time.Time{}
	}
	// The report was applied between before and answered; the cooldown,
	// the pool's spread included, ends within a minute of it.
	if u := until(keyID); u.IsZero() || u.After(answered.Add(time.Minute)) {
		t.Fatalf("client report cooled the key until %v (%v from now), want at most a minute", u, time.Until(u))
	}
	if code, m, _ := k.do("POST", "/key/"+keyID+"/report", k.admin, map[string]any{"outcome": "rate_limited", "retry_after": 3600}); code != 200 {
		t.Fatalf("admin report: %d %v", code, m)
	}
	if u := until(keyID); u.Before(before.Add(50 * time.Minute)) {
		t.Fatalf("admin report cooled the key until %v, want about an hour", u)
	}
}
