package server_test

import (
	"net/http"
	"testing"
)

// TestAuthSlowdownNeverLocksOutValidCredentials: a loop of bad tokens
// from one address is slowed down (429 with Retry-After), while the admin
// token and a valid team token from the same address keep being served,
// on the proxy, the lease endpoint and the admin API.
func TestAuthSlowdownNeverLocksOutValidCredentials(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", nil)
	k.addKey("openai", "sk-slowdown-0123456789abcdef", nil)
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)
	m := k.mustAdmin("POST", "/admin/tokens", map[string]any{"name": "old", "team_id": team}, http.StatusCreated)
	revoked, _ := m["token"].(string)
	k.secrets = append(k.secrets, revoked)
	k.mustAdmin("PATCH", "/admin/tokens/"+m["id"].(string), map[string]any{"is_active": false}, http.StatusOK)

	bad := []string{"kp_not_a_real_token_0123456789abcdef", revoked, "garbage"}
	slowedProxy, slowedAdmin := false, false
	for i := range 40 {
		b := bad[i%len(bad)]
		if st, _, resp := k.do("GET", "/v1/openai/models", b, nil); st == http.StatusTooManyRequests {
			slowedProxy = true
			if resp.Header.Get("Retry-After") == "" {
				t.Fatalf("429 without Retry-After")
			}
		} else if st != http.StatusUnauthorized {
			t.Fatalf("bad token %d on the proxy: %d", i, st)
		}
		if st, _, _ := k.do("GET", "/admin/services", b, nil); st == http.StatusTooManyRequests {
			slowedAdmin = true
		} else if st != http.StatusUnauthorized {
			t.Fatalf("bad token %d on the admin API: %d", i, st)
		}
		// Interleaved, the valid credentials are always served.
		if st, body, _ := k.do("GET", "/v1/openai/models", tok, nil); st != http.StatusOK {
			t.Fatalf("after %d bad tokens the team token got %d: %v", i+1, st, body)
		}
		if st, body, _ := k.do("GET", "/admin/services", k.admin, nil); st != http.StatusOK {
			t.Fatalf("after %d bad tokens the admin token got %d: %v", i+1, st, body)
		}
	}
	if !slowedProxy || !slowedAdmin {
		t.Fatalf("bad tokens were never slowed down (proxy %v, admin %v)", slowedProxy, slowedAdmin)
	}
}
