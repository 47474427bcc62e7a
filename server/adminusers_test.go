package server

import (
	"crypto/tls"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"
)

func TestCookieSecure(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	cases := []struct {
		name, mode, remote, proto string
		tls                       bool
		want                      bool
	}{
		{"plain http", "", "192.0.2.1:1", "", false, false},
		{"tls", "", "192.0.2.1:1", "", true, true},
		{"trusted tls proxy", "auto", "10.1.2.3:1", "https", false, true},
		{"untrusted proxy header", "auto", "192.0.2.1:1", "https", false, false},
		{"trusted proxy, plain", "auto", "10.1.2.3:1", "http", false, false},
		{"always", "always", "192.0.2.1:1", "", false, true},
		{"never", "never", "192.0.2.1:1", "", true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := &Server{cfg: Config{Console: ConsoleConfig{CookieSecure: c.mode}}, gate: gate{clients: clientIPs{trusted: trusted}}}
			r := httptest.NewRequest("GET", "/console/", nil)
			r.RemoteAddr = c.remote
			if c.proto != "" {
				r.Header.Set("X-Forwarded-Proto", c.proto)
			}
			if c.tls {
				r.TLS = &tls.ConnectionState{}
			}
			if got := s.cookieSecure(r); got != c.want {
				t.Errorf("cookieSecure = %v, want %v", got, c.want)
			}
		})
	}
}

func TestConsoleEnv(t *testing.T) {
	var c Config
	env := map[string]string{EnvSessionTTL: "90m", EnvCookieSecure: "Always"}
	if err := c.ApplyEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	if time.Duration(c.Console.SessionTTL) != 90*time.Minute || c.Console.CookieSecure != CookieSecureAlways {
		t.Fatalf("console config = %+v", c.Console)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.Console.CookieSecure = "sometimes"
	if err := c.Validate(); err == nil {
		t.Error("cookie_secure=sometimes accepted")
	}
}
