package server

import (
	"net/http/httptest"
	"testing"
)

func TestClientIPs(t *testing.T) {
	trusted, err := parsePrefixes([]string{"10.0.0.0/8", "192.0.2.7"})
	if err != nil {
		t.Fatal(err)
	}
	c := clientIPs{trusted: trusted}
	tests := []struct {
		name, remote, xff, want string
	}{
		{"direct client, header ignored", "203.0.113.9:5000", "1.2.3.4", "203.0.113.9"},
		{"through the balancer", "10.1.2.3:5000", "198.51.100.20", "198.51.100.20"},
		{"spoofed entry left of the real one", "10.1.2.3:5000", "6.6.6.6, 198.51.100.20", "198.51.100.20"},
		{"two trusted hops", "10.1.2.3:5000", "198.51.100.20, 192.0.2.7", "198.51.100.20"},
		{"malformed chain", "10.1.2.3:5000", "not-an-ip", "10.1.2.3"},
		{"no header", "10.1.2.3:5000", "", "10.1.2.3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/", nil)
			r.RemoteAddr = tt.remote
			if tt.xff != "" {
				r.Header.Set("X-Forwarded-For", tt.xff)
			}
			if got := c.of(r); got != tt.want {
				t.Fatalf("of() = %q, want %q", got, tt.want)
			}
		})
	}
	if got := (clientIPs{}).of(httptest.NewRequest("GET", "/", nil)); got != "192.0.2.1" {
		t.Fatalf("without trusted proxies: %q", got)
	}
	if _, err := parsePrefixes([]string{"10.0.0.0/33"}); err == nil {
		t.Fatal("bad CIDR accepted")
	}
}
