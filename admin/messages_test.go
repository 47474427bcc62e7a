package admin_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/store"
)

// TestFirstErrorsANewUserMeetsSayHowToFixThem: a base_url without a
// scheme, an array posted where an object is expected and a team token on
// the admin API each get a message that names the fix.
func TestFirstErrorsANewUserMeetsSayHowToFixThem(t *testing.T) {
	e := newEnv(t, backends[0])
	team := e.must(201, "POST", "/admin/teams", map[string]any{"name": "eng"}).json(t)
	tok := e.must(201, "POST", "/admin/tokens", map[string]any{"name": "t", "team_id": team["id"]}).json(t)["token"].(string)

	r := e.must(400, "POST", "/admin/services", `{"name":"openai","base_url":"api.openai.com"}`)
	if m := r.message(); !strings.Contains(m, `not "api.openai.com"`) || !strings.Contains(m, `"https://api.openai.com"`) {
		t.Errorf("base_url without a scheme: %q", m)
	}
	r = e.must(400, "POST", "/admin/services", `{"name":"openai","base_url":"ftp://api.openai.com"}`)
	if m := r.message(); !strings.Contains(m, `not "ftp://api.openai.com"`) || strings.Contains(m, "did you mean") {
		t.Errorf("ftp base_url: %q", m)
	}

	r = e.must(400, "POST", "/admin/keys", `[{"service":"openai","key_value":"sk-array-0000000001"}]`)
	if m := r.message(); !strings.Contains(m, "expected a JSON object, not an array") || !strings.Contains(m, "POST /admin/keys/import") || strings.Contains(m, "keyInput") {
		t.Errorf("array to POST /admin/keys: %q", m)
	}
	r = e.must(400, "POST", "/admin/teams", `"eng"`)
	if m := r.message(); m != "expected a JSON object, not a string" {
		t.Errorf("string to POST /admin/teams: %q", m)
	}
	e.noSecret("sk-array-0000000001")

	for _, c := range []struct{ name, tok, want string }{
		{"team token", tok, "this is a team token; the admin API needs the admin token"},
		// The shape alone decides: no store lookup.
		{"unknown kp_ token", "kp_" + strings.Repeat("x", 43), "this is a team token; the admin API needs the admin token"},
		{"other token", "nope", "the admin API requires Authorization: Bearer <admin token>"},
	} {
		r := e.do("GET", "/admin/services", nil, withToken(c.tok))
		if r.status != 401 || r.code() != "invalid_token" || r.message() != c.want {
			t.Errorf("%s: %d %q %q", c.name, r.status, r.code(), r.message())
		}
	}
}

// TestUsageCostIsRoundedInJSON: a cost with float noise is listed
// rounded (0.0000102, not 0.000010199999999999999).
func TestUsageCostIsRoundedInJSON(t *testing.T) {
	e := newEnv(t, backends[0])
	e.must(201, "POST", "/admin/services", `{"name":"openai","base_url":"https://api.openai.com"}`)
	rec := store.UsageRecord{Time: time.Date(2025, 1, 30, 10, 0, 0, 0, time.UTC), Service: "openai", Model: "gpt-4o-mini",
		Status: 200, TokensIn: 12, TokensOut: 9, Cost: 0.000010199999999999999}
	if err := e.st.AppendUsage(context.Background(), []store.UsageRecord{rec}); err != nil {
		t.Fatal(err)
	}
	r := e.must(200, "GET", "/admin/usage?group_by=service", nil)
	if !strings.Contains(string(r.body), `"cost":0.0000102}`) {
		t.Errorf("usage JSON: %s", r.body)
	}
	r = e.must(200, "GET", "/admin/usage?group_by=service&format=csv", nil)
	if !strings.Contains(string(r.body), "openai,1,12,9,0.0000102\n") {
		t.Errorf("usage CSV: %q", r.body)
	}
}
