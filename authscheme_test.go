package keypool

import (
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestAuthSchemes(t *testing.T) {
	const key = "sk-test-0123456789"
	tests := []struct {
		name   string
		header string
		want   string
		query  string
	}{
		{"bearer", "Authorization", "Bearer " + key, ""},
		{"x-api-key", "X-Api-Key", key, ""},
		{"xi-api-key", "Xi-Api-Key", key, ""},
		{"authorization-raw", "Authorization", key, ""},
		{"authorization-token", "Authorization", "Token " + key, ""},
		{"query-param", "", "", "api_key"},
		{"header:x-goog-api-key", "X-Goog-Api-Key", key, ""},
		{"query:key", "", "", "key"},
		{"basic", "Authorization", "Basic c2stdGVzdC0wMTIzNDU2Nzg5Og==", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseAuthScheme(tt.name)
			if err != nil {
				t.Fatal(err)
			}
			if a.Name() != tt.name {
				t.Errorf("Name() = %q", a.Name())
			}
			r := httptest.NewRequest("GET", "http://up/x?api_key=client&key=client&q=1", nil)
			r.Header.Set(tt.header+"X", "keep")
			if tt.header != "" {
				r.Header.Set(tt.header, "client-value")
			}
			a.Inject(r, key)
			if tt.header != "" {
				if got := r.Header.Values(tt.header); len(got) != 1 || got[0] != tt.want {
					t.Fatalf("%s = %q, want only %q", tt.header, got, tt.want)
				}
			}
			if tt.query != "" {
				q := r.URL.Query()
				if got := q[tt.query]; len(got) != 1 || got[0] != key {
					t.Fatalf("query %s = %q", tt.query, got)
				}
				if q.Get("q") != "1" {
					t.Fatal("other query values lost")
				}
			}
		})
	}
	for _, bad := range []string{"nope", "header:", "header:bad name", "query:", "query:a b"} {
		if _, err := ParseAuthScheme(bad); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "bearer") {
			t.Errorf("ParseAuthScheme(%q) = %v, want a clear error", bad, err)
		}
	}
}

// TestAuthSchemeRejectsHeadersTheTransportDrops: a key put in Host,
// Content-Length, or a hop-by-hop or framing header would be dropped or
// would break the request, so such schemes are refused with a clear
// message (issue 16 item 10).
func TestAuthSchemeRejectsHeadersTheTransportDrops(t *testing.T) {
	for _, name := range []string{"Host", "host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "TE",
		"Trailer", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "proxy-foo"} {
		_, err := ParseAuthScheme("header:" + name)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "cannot carry a key") || !strings.Contains(err.Error(), name) {
			t.Errorf("header:%s: %v, want a clear refusal", name, err)
		}
	}
	for _, name := range []string{"X-Api-Key", "Authorization", "Api-Key", "Hostname", "X-Host"} {
		if _, err := ParseAuthScheme("header:" + name); err != nil {
			t.Errorf("header:%s refused: %v", name, err)
		}
	}
}
