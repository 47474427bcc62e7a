package server_test

import (
	"os"
	"strings"
	"testing"

	"github.com/keypool/keypool/server"
)

// TestExampleConfig: examples/keypool.yaml configures the twelve services
// of the README's SDK table, and keypoold starts with it: each service has
// its auth scheme, metering family and (Cartesia) its version header.
func TestExampleConfig(t *testing.T) {
	cfg, err := server.LoadFile("../examples/keypool.yaml", os.LookupEnv)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"openai": "bearer", "groq": "bearer", "anthropic": "x-api-key", "gemini": "header:x-goog-api-key",
		"exa": "x-api-key", "firecrawl": "bearer", "tavily": "bearer", "serper": "x-api-key",
		"elevenlabs": "xi-api-key", "cartesia": "x-api-key", "deepgram": "authorization-token",
		"assemblyai": "authorization-raw",
	}
	if len(cfg.Services) != len(want) {
		t.Fatalf("%d services, want %d", len(cfg.Services), len(want))
	}
	k := startKP(t, func(c *server.Config) { c.Services = cfg.Services })
	for name, scheme := range want {
		m := k.mustAdmin("GET", "/admin/services/"+name, nil, 200)
		if !strings.EqualFold(m["auth_scheme"].(string), scheme) || m["llm_family"] == nil || m["description"] == "" {
			t.Errorf("%s: %v", name, m)
		}
	}
	m := k.mustAdmin("GET", "/admin/services/cartesia", nil, 200)
	if h, _ := m["proxy_headers"].(map[string]any); h["Cartesia-Version"] != "2024-06-10" {
		t.Errorf("cartesia proxy_headers: %v", m["proxy_headers"])
	}
}
