package server_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// TestProviderShapes drives keypoold the way each provider's SDK calls it
// (path, token placement, extra headers), against an upstream that checks
// the key the way that provider does: the first key is rate-limited, so
// every call also fails over. The upstream must see the pooled key in the
// provider's own scheme, the right path, and never the team token.
func TestProviderShapes(t *testing.T) {
	type shape struct {
		service, scheme string
		extra           map[string]any
		method, path    string
		place           func(r *http.Request, tok string)
		key             func(r *http.Request) string // the key as the upstream reads it
		upstreamPath    string
		check           func(r *http.Request) string
	}
	bearer := func(r *http.Request, tok string) { r.Header.Set("Authorization", "Bearer "+tok) }
	hdr := func(name string) func(r *http.Request, tok string) {
		return func(r *http.Request, tok string) { r.Header.Set(name, tok) }
	}
	fromBearer := func(r *http.Request) string { return strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ") }
	fromHeader := func(name string) func(r *http.Request) string {
		return func(r *http.Request) string { return r.Header.Get(name) }
	}
	shapes := []shape{
		{service: "openai", scheme: "bearer", method: "POST", path: "/v1/openai/v1/chat/completions", place: bearer, key: fromBearer, upstreamPath: "/v1/chat/completions"},
		{service: "groq", scheme: "bearer", method: "POST", path: "/v1/groq/openai/v1/chat/completions", place: bearer, key: fromBearer, upstreamPath: "/openai/v1/chat/completions"},
		{service: "anthropic", scheme: "x-api-key", method: "POST", path: "/v1/anthropic/v1/messages", place: hdr("X-Api-Key"), key: fromHeader("X-Api-Key"), upstreamPath: "/v1/messages",
			check: func(r *http.Request) string {
				if r.Header.Get("Anthropic-Version") != "2023-06-01" {
					return "anthropic-version not passed through"
				}
				return ""
			}},
		{service: "anthropic-bearer-sdk", scheme: "x-api-key", method: "POST", path: "/v1/anthropic-bearer-sdk/v1/messages", place: bearer, key: fromHeader("X-Api-Key"), upstreamPath: "/v1/messages",
			check: func(r *http.Request) string {
				if r.Header.Get("Authorization") != "" {
					return "inbound Authorization forwarded"
				}
				return ""
			}},
		{service: "gemini", scheme: "header:x-goog-api-key", method: "POST", path: "/v1/gemini/v1beta/models/gemini-2.0-flash:generateContent", place: hdr("X-Goog-Api-Key"), key: fromHeader("X-Goog-Api-Key"), upstreamPath: "/v1beta/models/gemini-2.0-flash:generateContent"},
		{service: "gemini-query", scheme: "query:key", method: "POST", path: "/v1/gemini-query/v1beta/models/gemini-2.0-flash:generateContent",
			place: func(r *http.Request, tok string) { r.URL.RawQuery = "key=" + url.QueryEscape(tok) + "&alt=sse" },
			key:   func(r *http.Request) string { return r.URL.Query().Get("key") }, upstreamPath: "/v1beta/models/gemini-2.0-flash:generateContent",
			check: func(r *http.Request) string {
				if r.URL.Query().Get("alt") != "sse" || len(r.URL.Query()["key"]) != 1 {
					return "query not kept, or key not unique: " + r.URL.RawQuery
				}
				return ""
			}},
		{service: "exa", scheme: "x-api-key", method: "POST", path: "/v1/exa/search", place: hdr("X-Api-Key"), key: fromHeader("X-Api-Key"), upstreamPath: "/search"},
		{service: "firecrawl", scheme: "bearer", method: "POST", path: "/v1/firecrawl/v1/scrape", place: bearer, key: fromBearer, upstreamPath: "/v1/scrape"},
		{service: "tavily", scheme: "bearer", method: "POST", path: "/v1/tavily/search", place: bearer, key: fromBearer, upstreamPath: "/search"},
		{service: "serper", scheme: "x-api-key", method: "POST", path: "/v1/serper/search", place: hdr("X-API-KEY"), key: fromHeader("X-Api-Key"), upstreamPath: "/search"},
		{service: "elevenlabs", scheme: "xi-api-key", method: "POST", path: "/v1/elevenlabs/v1/text-to-speech/voice123", place: hdr("Xi-Api-Key"), key: fromHeader("Xi-Api-Key"), upstreamPath: "/v1/text-to-speech/voice123"},
		{service: "cartesia", scheme: "x-api-key", extra: map[string]any{"proxy_headers": map[string]string{"Cartesia-Version": "2024-06-10"}},
			method: "POST", path: "/v1/cartesia/tts/bytes", place: bearer, key: fromHeader("X-Api-Key"), upstreamPath: "/tts/bytes",
			check: func(r *http.Request) string {
				if v := r.Header.Values("Cartesia-Version"); len(v) != 1 || v[0] != "2024-06-10" {
					return "Cartesia-Version not injected once: " + strings.Join(v, ",")
				}
				return ""
			}},
		{service: "deepgram", scheme: "authorization-token", method: "POST", path: "/v1/deepgram/v1/listen?model=nova-2",
			place: func(r *http.Request, tok string) { r.Header.Set("Authorization", "Token "+tok) },
			key:   func(r *http.Request) string { return strings.TrimPrefix(r.Header.Get("Authorization"), "Token ") }, upstreamPath: "/v1/listen",
			check: func(r *http.Request) string {
				if r.URL.Query().Get("model") != "nova-2" {
					return "query lost"
				}
				return ""
			}},
		{service: "assemblyai", scheme: "authorization-raw", method: "POST", path: "/v1/assemblyai/v2/transcript", place: hdr("Authorization"), key: fromHeader("Authorization"), upstreamPath: "/v2/transcript"},
	}

	k := startKP(t)
	teamID := k.addTeam("sdk-users", nil)
	tok := k.addToken(teamID, nil)
	for _, sh := range shapes {
		t.Run(sh.service, func(t *testing.T) {
			var got []*http.Request
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				got = append(got, r.Clone(r.Context()))
				switch sh.key(r) {
				case keyA:
					w.Header().Set("Retry-After", "30")
					w.WriteHeader(http.StatusTooManyRequests)
				case keyB:
					w.Header().Set("Content-Type", "application/json")
					_ = json.NewEncoder(w).Encode(map[string]string{"ok": "yes"})
				default:
					w.WriteHeader(http.StatusUnauthorized)
				}
			})
			k.addService(sh.service, up.URL, sh.scheme, sh.extra)
			k.addKey(sh.service, keyA, map[string]any{"priority": 0})
			k.addKey(sh.service, keyB, map[string]any{"priority": 1})
			k.mustAdmin("PATCH", "/admin/services/"+sh.service, map[string]any{"selector": "ordered"}, http.StatusOK)
			k.srv.Syncer().Trigger()
			eventually(t, "keys loaded", func() bool { st, _ := k.srv.Pool().Stats(sh.service); return len(st) == 2 })

			req, _ := http.NewRequest(sh.method, k.url+sh.path, strings.NewReader(`{"input":"hello"}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Anthropic-Version", "2023-06-01")
			sh.place(req, tok)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d, want 200 after failing over", resp.StatusCode)
			}
			if len(got) != 2 {
				t.Fatalf("upstream saw %d requests, want 2 (429 then failover)", len(got))
			}
			last := got[1]
			if sh.key(last) != keyB || last.URL.Path != sh.upstreamPath {
				t.Fatalf("upstream got key %q on %s, want keyB on %s", sh.key(last), last.URL.Path, sh.upstreamPath)
			}
			for _, r := range got {
				for name, vs := range r.Header {
					for _, v := range vs {
						if strings.Contains(v, tok) {
							t.Fatalf("team token forwarded in %s", name)
						}
					}
				}
				if strings.Contains(r.URL.RawQuery, tok) {
					t.Fatal("team token forwarded in the query")
				}
			}
			if sh.check != nil {
				if msg := sh.check(last); msg != "" {
					t.Fatal(msg)
				}
			}
		})
	}
	k.checkLogs()
}
