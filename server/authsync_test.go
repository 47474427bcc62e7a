package server_test

import (
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store/storetest"
)

// TestRevocationReachesEveryReplica: a token deactivated through replica
// 1 is refused by replica 2, which had it cached (auth cache TTL an hour,
// so only the change channel can tell it), within a second, through
// PostgreSQL NOTIFY alone and through Redis pub/sub alone.
func TestRevocationReachesEveryReplica(t *testing.T) {
	cases := map[string]func(t *testing.T) []kpOption{
		"postgres notify": func(t *testing.T) []kpOption {
			dsn := storetest.PostgresDSN(t)
			o := func(c *server.Config) { c.Database = server.SecretURL(dsn) }
			return []kpOption{o, o}
		},
		"redis pubsub": func(t *testing.T) []kpOption {
			url := os.Getenv("KEYPOOL_TEST_REDIS")
			if url == "" {
				t.Skip("KEYPOOL_TEST_REDIS is not set")
			}
			var db server.SecretURL
			return []kpOption{
				func(c *server.Config) { c.RedisURL = server.SecretURL(url); db = c.Database },
				func(c *server.Config) { c.RedisURL = server.SecretURL(url); c.Database = db },
			}
		},
	}
	for name, opts := range cases {
		t.Run(name, func(t *testing.T) {
			o := opts(t)
			slow := func(c *server.Config) {
				c.AuthCacheTTL = server.Duration(time.Hour)
				c.SyncInterval = server.Duration(time.Hour)
			}
			up := newUpstream(t, okJSON)
			k1 := startKP(t, o[0], slow)
			k2 := startKP(t, o[1], slow)
			k1.addService("openai", up.URL, "bearer", nil)
			k1.addKey("openai", keyA, nil)
			team := k1.addTeam("eng", nil)
			m := k1.mustAdmin("POST", "/admin/tokens", map[string]any{"name": "t", "team_id": team}, http.StatusCreated)
			tok, id := m["token"].(string), m["id"].(string)
			k1.secrets = append(k1.secrets, tok)
			k2.srv.Syncer().Trigger()
			eventually(t, "replica 2 serves the token", func() bool {
				code, _, _ := k2.do("GET", "/v1/openai/v1/models", tok, nil)
				return code == 200
			})
			start := time.Now()
			k1.mustAdmin("PATCH", "/admin/tokens/"+id, map[string]any{"is_active": false}, http.StatusOK)
			for {
				code, _, _ := k2.do("GET", "/v1/openai/v1/models", tok, nil)
				if code == http.StatusUnauthorized {
					break
				}
				if time.Since(start) > time.Second {
					t.Fatalf("replica 2 still serves a token revoked on replica 1 after %v (status %d)", time.Since(start), code)
				}
				time.Sleep(5 * time.Millisecond)
			}
			t.Logf("revoked on replica 1, refused by replica 2 after %v", time.Since(start))
		})
	}
}
