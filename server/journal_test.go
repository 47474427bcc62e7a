package server_test

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

// TestJournalReplayedAtStart: records a process journaled but never wrote
// to the store (it died) are replayed when keypoold starts, before the
// budgets are seeded and the keys loaded: the team's day total refuses
// the next request, the key's balance_used counts them, and a second
// start does not count them again.
func TestJournalReplayedAtStart(t *testing.T) {
	up := newUpstream(t, usage150)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	keyID := k.addKey("openai", "sk-replay-0123456789abcdef", map[string]any{"balance_total": 1e6, "balance_unit": "tokens"})
	team := k.addTeam("eng", map[string]any{"daily_token_limit": 1000})
	tok := k.addToken(team, nil)
	if err := k.stop(); err != nil {
		t.Fatal(err)
	}

	// A process that died with seven requests journaled (1050 tokens).
	j, err := store.OpenJournal(store.JournalOptions{Dir: filepath.Join(k.dir, "journal")})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		rec := store.UsageRecord{Time: time.Now().UTC(), ID: "dead-" + string(rune('a'+i)), TeamID: team, Service: "openai",
			KeyID: keyID, Status: 200, TokensIn: 100, TokensOut: 50, KeySpend: 150}
		if err := j.Append(&rec); err != nil {
			t.Fatal(err)
		}
	}
	_ = j.Close() // nothing marked done: the files stay, as after a crash

	db := func(c *server.Config) { c.Database = server.SecretURL("sqlite:" + filepath.Join(k.dir, "keypool.db")) }
	for start := range 2 {
		k2 := startKP(t, fastUsage, db)
		resp, b := k2.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","messages":[]}`)
		if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), "1050 tokens used") {
			t.Fatalf("start %d: %d %s, want 429 at 1050 tokens used (the replayed records)", start, resp.StatusCode, b)
		}
		key, err := k2.srv.Store().GetKey(context.Background(), keyID)
		if err != nil || key.BalanceUsed != 1050 {
			t.Fatalf("start %d: balance_used %v (%v), want 1050", start, key.BalanceUsed, err)
		}
		rows, err := k2.srv.Store().QueryUsage(context.Background(), store.UsageQuery{Team: team})
		if err != nil || len(rows) != 1 || rows[0].Requests != 7 {
			t.Fatalf("start %d: usage %+v %v, want 7 records", start, rows, err)
		}
		if err := k2.stop(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestUsageJournalEnv(t *testing.T) {
	for _, tc := range []struct {
		v        string
		disabled bool
		dir      string
	}{{"off", true, ""}, {"OFF", true, ""}, {"/var/lib/keypool/journal", false, "/var/lib/keypool/journal"}} {
		var c server.Config
		if err := c.ApplyEnv(func(k string) (string, bool) { return tc.v, k == server.EnvUsageJournal }); err != nil {
			t.Fatal(err)
		}
		if c.UsageJournal.Disabled != tc.disabled || c.UsageJournal.Dir != tc.dir {
			t.Errorf("%s=%q: %+v", server.EnvUsageJournal, tc.v, c.UsageJournal)
		}
	}
}
