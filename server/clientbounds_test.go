package server_test

import (
	"fmt"
	"strings"
	"testing"
)

// TestClientChosenServiceNamesNeverBecomeMetricLabels: requests refused
// before their service is checked must not mint a metric series per
// client-chosen name.
func TestClientChosenServiceNamesNeverBecomeMetricLabels(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	setup(t, k, up, nil, keyA)
	for i := range 5 {
		if code, _, _ := k.do("GET", fmt.Sprintf("/v1/attacker-chosen-%d/x", i), "", nil); code != 401 {
			t.Fatalf("unauthenticated request: %d", code)
		}
	}
	_, m, _ := k.do("GET", "/metrics", "", nil)
	if raw := m["_raw"].(string); strings.Contains(raw, "attacker-chosen") {
		t.Fatal("a client-chosen service name became a metric label")
	}
}

// TestLeaseTokenReportsOnlyOnItsTeamsServicesAndHEADTakesNoLease: a
// lease-scoped token may report only on keys of services its team may
// use; HEAD does not take a lease.
func TestLeaseTokenReportsOnlyOnItsTeamsServicesAndHEADTakesNoLease(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	_, ids := setup(t, k, up, nil, keyA)
	team := k.addTeam("others", map[string]any{"allowed_services": []string{"other"}})
	leaser := k.addToken(team, map[string]any{"scopes": []string{"lease"}})
	code, m, _ := k.do("POST", "/key/"+ids[0]+"/report", leaser, map[string]any{"outcome": "invalid"})
	if code != 400 {
		t.Fatalf("report on another service's key: %d %v", code, m)
	}
	if st, _ := k.srv.Pool().Stats("openai"); st[0].State.String() != "active" {
		t.Fatalf("key state changed to %v", st[0].State)
	}
	if code, _, _ := k.do("HEAD", "/key?service=openai", k.srv.AdminToken().Reveal(), nil); code != 405 {
		t.Fatalf("HEAD /key: %d, want 405", code)
	}
	if st, _ := k.srv.Pool().Stats("openai"); st[0].InFlight != 0 {
		t.Fatal("HEAD took a lease")
	}
}
