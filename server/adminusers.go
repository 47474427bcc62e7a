package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/store"
)

// AdminPasswordFile is the file in [Config.DataDir] that keeps the
// generated password of the first admin user ("admin").
const AdminPasswordFile = "admin_password"

// Session and console environment variables.
const (
	EnvSessionTTL   = "KEYPOOL_SESSION_TTL"
	EnvCookieSecure = "KEYPOOL_COOKIE_SECURE"
)

// Cookie Secure modes of [ConsoleConfig.CookieSecure].
const (
	// CookieSecureAuto marks the session cookie Secure when the request
	// came over TLS, or from a trusted proxy (TrustedProxies) with
	// X-Forwarded-Proto: https.
	CookieSecureAuto = "auto"
	// CookieSecureAlways always marks it Secure.
	CookieSecureAlways = "always"
	// CookieSecureNever never does (plain HTTP on a trusted network).
	CookieSecureNever = "never"
)

// ConsoleConfig configures admin sign-in and the web console.
type ConsoleConfig struct {
	// SessionTTL is how long a sign-in (API access token or console
	// session) lasts. If zero, 12h.
	SessionTTL Duration `json:"session_ttl,omitempty" yaml:"session_ttl,omitempty"`
	// CookieSecure is auto, always or never (see the CookieSecure
	// constants). If empty, auto.
	CookieSecure string `json:"cookie_secure,omitempty" yaml:"cookie_secure,omitempty"`
	// Disabled turns the console off (GET / is then a JSON 404); sign-in
	// through the admin API still works.
	Disabled bool `json:"disabled,omitempty" yaml:"disabled,omitempty"`
	// Password sets the argon2id cost of new password hashes. If zero,
	// the auth package's defaults.
	Password auth.PasswordParams `json:"password,omitzero" yaml:"password,omitempty"`
}

func (c *ConsoleConfig) applyEnv(get func(string) (string, bool)) error {
	if v, ok := get(EnvSessionTTL); ok {
		var d Duration
		if err := d.UnmarshalText([]byte(v)); err != nil {
			return fmt.Errorf("server: %s: %w", EnvSessionTTL, err)
		}
		c.SessionTTL = d
	}
	if v, ok := get(EnvCookieSecure); ok {
		c.CookieSecure = strings.ToLower(v)
	}
	return nil
}

func (c *ConsoleConfig) validate() error {
	switch c.CookieSecure {
	case "", CookieSecureAuto, CookieSecureAlways, CookieSecureNever:
	default:
		return fmt.Errorf("server: cookie_secure must be auto, always or never, not %q", c.CookieSecure)
	}
	if c.SessionTTL < 0 {
		return errors.New("server: session_ttl must not be negative")
	}
	return nil
}

// bootstrapAdmin makes sure the console can be entered on a fresh
// install: when the store holds no admin user, it creates "admin" (role
// admin) with the password kept in DataDir/admin_password (generated,
// mode 0600, announced once on out, like the admin token).
func bootstrapAdmin(ctx context.Context, st store.AdminStore, dataDir, listen string, params auth.PasswordParams, out io.Writer) error {
	users, err := st.ListAdminUsers(ctx)
	if err != nil {
		return fmt.Errorf("server: read admin users: %w", err)
	}
	if len(users) > 0 {
		return nil
	}
	path := filepath.Join(dataDir, AdminPasswordFile)
	pw, created, err := readOrCreate(path, auth.GeneratePassword)
	if err != nil {
		return fmt.Errorf("server: first admin password: %w", err)
	}
	h, err := auth.HashPassword(pw, params)
	if err != nil {
		return fmt.Errorf("server: first admin password in %s: %w", path, err)
	}
	u := store.AdminUser{Username: "admin", PasswordHash: h, Role: store.RoleAdmin}
	if err := st.CreateAdminUser(ctx, &u); err != nil && !errors.Is(err, store.ErrConflict) {
		return fmt.Errorf("server: create the first admin user: %w", err)
	}
	if created {
		fmt.Fprintf(out, "\n"+
			"==================================================================\n"+
			" Console sign-in (open %s):\n\n"+
			"   username: admin\n"+
			"   password: %s\n\n"+
			" The password is kept in %s (mode 0600); change it with\n"+
			" `keypoold admin-user passwd admin` and delete that file.\n"+
			"==================================================================\n\n",
			consoleURL(listen), pw, path)
	}
	return nil
}

// consoleURL is the address a person on this machine opens for the
// console of a server listening on listen (":8080" and "0.0.0.0:8080"
// are reached as localhost).
func consoleURL(listen string) string {
	if listen == "" {
		listen = DefaultListen
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "http://" + listen + "/"
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, port) + "/"
}

// cookieSecure reports whether the console's session cookie must be
// Secure for request r (see [ConsoleConfig.CookieSecure]).
func (s *Server) cookieSecure(r *http.Request) bool {
	switch s.cfg.Console.CookieSecure {
	case CookieSecureAlways:
		return true
	case CookieSecureNever:
		return false
	}
	if r.TLS != nil {
		return true
	}
	return s.clients.isTrusted(remoteIP(r.RemoteAddr)) && strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

// pruneAdmin deletes expired sessions and audit entries older than the
// usage retention, hourly, until ctx is done.
func (s *Server) pruneAdmin(ctx context.Context) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		now := s.now()
		if _, err := s.st.PruneSessions(ctx, now); err != nil && ctx.Err() == nil {
			s.log.Warn("pruning expired sessions failed", "err", err)
		}
		if r := s.usageRetention(); r > 0 {
			if _, err := s.st.PruneAudit(ctx, now.Add(-r)); err != nil && ctx.Err() == nil {
				s.log.Warn("pruning the audit log failed", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// usageRetention is how long usage records, and so audit entries, are
// kept (negative: forever).
func (s *Server) usageRetention() time.Duration {
	if r := s.cfg.Usage.Retention; r != 0 {
		return r
	}
	return 30 * 24 * time.Hour
}
