package server

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/sso"
)

func TestOIDCEnv(t *testing.T) {
	env := func(m map[string]string) func(string) (string, bool) {
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	var c Config
	if err := c.ApplyEnv(env(map[string]string{
		"GOOGLE_CLIENT_ID": "123-abc.apps.googleusercontent.com", "GOOGLE_CLIENT_SECRET": "GOCSPX-x", "AUTH_BASE_URL": "https://proxy.internal",
		"KEYPOOL_OIDC_ALLOWED_DOMAINS": "example.com, bob@other.org", "KEYPOOL_OIDC_ADMINS": "root@example.com",
		"KEYPOOL_OIDC_TOKEN_TTL": "720h", "KEYPOOL_OIDC_DEFAULT_TEAM": "staff",
	})); err != nil {
		t.Fatal(err)
	}
	o := c.OIDC
	if o.Issuer != sso.GoogleIssuer || o.ClientID != "123-abc.apps.googleusercontent.com" || o.ClientSecret.Reveal() != "GOCSPX-x" ||
		o.BaseURL != "https://proxy.internal" || o.DefaultTeam != "staff" || o.TokenTTL.String() != "720h0m0s" || len(o.Admins) != 1 {
		t.Errorf("google env: %+v", o)
	}
	if d, e := o.splitAllowed(); len(d) != 1 || d[0] != "example.com" || len(e) != 1 || e[0] != "bob@other.org" {
		t.Errorf("allowed: %v %v", d, e)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("validate: %v", err)
	}
	// Pointed at another issuer, the Google variables still say Google.
	if err := c.ApplyEnv(env(map[string]string{"KEYPOOL_OIDC_ISSUER": "http://127.0.0.1:9"})); err != nil || c.OIDC.DisplayName() != "Google" {
		t.Errorf("Google variables with another issuer: button says %q (%v), want Google", c.OIDC.DisplayName(), err)
	}
	// Any provider: the KEYPOOL_ variables win.
	if err := c.ApplyEnv(env(map[string]string{"KEYPOOL_OIDC_ISSUER": "https://idp.example.com/realms/x", "KEYPOOL_OIDC_CLIENT_ID": "kp",
		"KEYPOOL_OIDC_CLIENT_SECRET": "s2", "KEYPOOL_AUTH_BASE_URL": "https://kp.example.com"})); err != nil {
		t.Fatal(err)
	}
	if c.OIDC.Issuer != "https://idp.example.com/realms/x" || c.OIDC.ClientID != "kp" || c.OIDC.BaseURL != "https://kp.example.com" {
		t.Errorf("generic env: %+v", c.OIDC)
	}
	if n := c.OIDC.DisplayName(); n != "SSO" {
		t.Errorf("generic provider: button says %q, want SSO", n)
	}
	if err := c.ApplyEnv(env(map[string]string{"KEYPOOL_OIDC_PROVIDER_NAME": "Keycloak"})); err != nil || c.OIDC.DisplayName() != "Keycloak" {
		t.Errorf("named provider: button says %q (%v)", c.OIDC.DisplayName(), err)
	}
	for name, bad := range map[string]OIDCConfig{
		"no secret":   {ClientID: "x", BaseURL: "https://a"},
		"no base url": {ClientID: "x", ClientSecret: "s"},
		"short state": {ClientID: "x", ClientSecret: "s", BaseURL: "https://a", StateSecret: "short"},
	} {
		if err := bad.validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if s := (OIDCConfig{ClientSecret: "GOCSPX-x"}); strings.Contains(slogText(s), "GOCSPX") {
		t.Error("the client secret prints")
	}
}

func slogText(v any) string {
	var b strings.Builder
	slog.New(slog.NewTextHandler(&b, nil)).Info("x", "v", v)
	return b.String()
}

// TestOIDCStateSecretGenerated: without KEYPOOL_OIDC_STATE_SECRET the
// secret is generated once into the data directory and kept.
func TestOIDCStateSecretGenerated(t *testing.T) {
	dir := t.TempDir()
	open := func() {
		s, err := New(context.Background(), Config{Database: SecretURL("sqlite:" + filepath.Join(dir, "k.db")), DataDir: dir,
			AdminToken: keypool.Secret("kpadm_x_0123456789012345678901234567890"), EncryptionKey: keypool.Secret(strings.Repeat("ab", 32)),
			Logger: slog.New(slog.DiscardHandler), Output: io.Discard,
			OIDC: OIDCConfig{Issuer: "http://127.0.0.1:1", ClientID: "c", ClientSecret: "s", BaseURL: "http://127.0.0.1:2"}})
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Shutdown(context.Background())
	}
	open()
	b1, err := os.ReadFile(filepath.Join(dir, OIDCStateSecretFile))
	if err != nil || len(strings.TrimSpace(string(b1))) != 64 {
		t.Fatalf("state secret file: %q %v", b1, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, OIDCStateSecretFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	open()
	if b2, _ := os.ReadFile(filepath.Join(dir, OIDCStateSecretFile)); string(b2) != string(b1) {
		t.Error("the state secret changed across restarts")
	}
}

// TestOIDCFile: the YAML file's oidc: section, secrets by ${ENV}.
func TestOIDCFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "keypool.yaml")
	if err := os.WriteFile(p, []byte(`oidc:
  issuer: https://idp.example.com/realms/main
  client_id: keypool
  client_secret: ${OIDC_SECRET}
  base_url: https://proxy.internal
  allowed_domains: [example.com]
  admins: [ops@example.com]
  admin_group: keypool-admins
  domain_teams: {corp.example.com: corp}
  token_ttl: 720h
  timeout: 3s
  allowed_emails: [guest@other.org]
  default_team: staff
  state_secret: ${STATE}
  provider_name: Okta
`), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := LoadFile(p, func(k string) (string, bool) {
		switch k {
		case "OIDC_SECRET":
			return "from-env", true
		case "STATE":
			return strings.Repeat("s", 32), true
		}
		return "", false
	})
	if err != nil {
		t.Fatal(err)
	}
	o := c.OIDC
	if o.Issuer != "https://idp.example.com/realms/main" || o.ClientID != "keypool" || o.ClientSecret.Reveal() != "from-env" ||
		o.BaseURL != "https://proxy.internal" || o.DomainTeams["corp.example.com"] != "corp" || o.AdminGroup != "keypool-admins" ||
		o.TokenTTL.String() != "720h0m0s" || o.Timeout.String() != "3s" || len(o.AllowedDomains) != 1 || len(o.Admins) != 1 ||
		len(o.AllowedEmails) != 1 || o.DefaultTeam != "staff" || o.StateSecret.Reveal() != strings.Repeat("s", 32) || o.DisplayName() != "Okta" {
		t.Errorf("oidc section: %+v", o)
	}
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
}
