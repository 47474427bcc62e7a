package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/sso"
)

// OIDCStateSecretFile is the file in [Config.DataDir] that keeps a
// generated OIDC state secret (mode 0600).
const OIDCStateSecretFile = "oidc_state.secret"

// Environment variables of single sign-on, read by [Config.ApplyEnv].
// The Google ones set the issuer to https://accounts.google.com; the
// KEYPOOL_OIDC_* ones override them.
const (
	EnvGoogleClientID         = "GOOGLE_CLIENT_ID"
	EnvGoogleClientSecret     = "GOOGLE_CLIENT_SECRET"
	EnvGoogleAuthBaseURL      = "AUTH_BASE_URL"
	EnvOIDCIssuer             = "KEYPOOL_OIDC_ISSUER"
	EnvOIDCClientID           = "KEYPOOL_OIDC_CLIENT_ID"
	EnvOIDCClientSecret       = "KEYPOOL_OIDC_CLIENT_SECRET"
	EnvAuthBaseURL            = "KEYPOOL_AUTH_BASE_URL"
	EnvOIDCStateSecret        = "KEYPOOL_OIDC_STATE_SECRET"
	EnvOIDCAllowedDomains     = "KEYPOOL_OIDC_ALLOWED_DOMAINS"
	EnvOIDCAllowedEmails      = "KEYPOOL_OIDC_ALLOWED_EMAILS"
	EnvOIDCAdmins             = "KEYPOOL_OIDC_ADMINS"
	EnvOIDCDefaultTeam        = "KEYPOOL_OIDC_DEFAULT_TEAM"
	EnvOIDCDomainTeams        = "KEYPOOL_OIDC_DOMAIN_TEAMS"
	EnvOIDCAdminGroup         = "KEYPOOL_OIDC_ADMIN_GROUP"
	EnvOIDCTokenTTL           = "KEYPOOL_OIDC_TOKEN_TTL"
	EnvOIDCDiscoveryTimeout   = "KEYPOOL_OIDC_TIMEOUT"
	EnvOIDCProviderName       = "KEYPOOL_OIDC_PROVIDER_NAME"
	defaultOIDCStartupTimeout = 5 * time.Second
)

// OIDCConfig configures sign-in with Google or any OpenID Connect
// provider (the YAML file's oidc: section). It is on when ClientID is set.
type OIDCConfig struct {
	// Issuer is the provider's issuer URL. If empty (with a ClientID),
	// Google's, https://accounts.google.com.
	Issuer string `json:"issuer,omitempty" yaml:"issuer,omitempty"`
	// ClientID and ClientSecret are the OAuth client registered with the
	// provider.
	ClientID     string         `json:"client_id,omitempty" yaml:"client_id,omitempty"`
	ClientSecret keypool.Secret `json:"client_secret,omitempty" yaml:"client_secret,omitempty"`
	// BaseURL is keypoold's public URL: the redirect URI to register is
	// BaseURL/auth/callback. Required with ClientID.
	BaseURL string `json:"base_url,omitempty" yaml:"base_url,omitempty"`
	// StateSecret MACs sign-in state (32 characters at least). If empty,
	// read from DataDir/oidc_state.secret or generated there; replicas
	// must share it (set it, or share the file).
	StateSecret keypool.Secret `json:"state_secret,omitempty" yaml:"state_secret,omitempty"`
	// AllowedDomains lists email domains that may sign in; an entry with
	// an "@" and a local part is a single address. AllowedEmails lists
	// addresses. Both empty: any verified email.
	AllowedDomains []string `json:"allowed_domains,omitempty" yaml:"allowed_domains,omitempty"`
	AllowedEmails  []string `json:"allowed_emails,omitempty" yaml:"allowed_emails,omitempty"`
	// Admins are emails that may sign in to the admin console by SSO.
	Admins []string `json:"admins,omitempty" yaml:"admins,omitempty"`
	// AdminGroup, if set, makes admins of people whose ID token's
	// "groups" claim holds it.
	AdminGroup string `json:"admin_group,omitempty" yaml:"admin_group,omitempty"`
	// DefaultTeam names the team new users join (created when missing).
	// If empty, "sso".
	DefaultTeam string `json:"default_team,omitempty" yaml:"default_team,omitempty"`
	// DomainTeams maps an email domain to the team its new users join
	// instead (env: "example.com=engineering,corp.example=corp").
	DomainTeams map[string]string `json:"domain_teams,omitempty" yaml:"domain_teams,omitempty"`
	// TokenTTL is the lifetime of tokens made by sign-in. If zero, they
	// do not expire.
	TokenTTL Duration `json:"token_ttl,omitempty" yaml:"token_ttl,omitempty"`
	// Timeout bounds each call to the provider. If zero, 10s; discovery
	// at start waits at most 5s and is retried on the first sign-in.
	Timeout Duration `json:"timeout,omitempty" yaml:"timeout,omitempty"`
	// ProviderName names the provider on the console's button, "Sign in
	// with <name>". If empty, "Google" when the Google variables name the
	// client or the issuer is Google's, else "SSO".
	ProviderName string `json:"provider_name,omitempty" yaml:"provider_name,omitempty"`

	// google reports whether GOOGLE_CLIENT_ID named the client.
	google bool
}

// Enabled reports whether sign-in is configured.
func (c *OIDCConfig) Enabled() bool { return c.ClientID != "" }

// DisplayName is the provider's name on the console's sign-in button.
func (c *OIDCConfig) DisplayName() string {
	switch {
	case c.ProviderName != "":
		return c.ProviderName
	case c.google || c.Issuer == "" || c.Issuer == sso.GoogleIssuer:
		return "Google"
	}
	return "SSO"
}

func (c *OIDCConfig) applyEnv(get func(string) (string, bool)) error {
	list := func(v string) []string {
		var out []string
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
		return out
	}
	if v, ok := get(EnvGoogleClientID); ok {
		c.ClientID, c.Issuer, c.google = v, sso.GoogleIssuer, true
	}
	if v, ok := get(EnvGoogleClientSecret); ok {
		c.ClientSecret = keypool.Secret(v)
	}
	if v, ok := get(EnvGoogleAuthBaseURL); ok {
		c.BaseURL = v
	}
	for _, f := range [...]struct {
		env string
		dst *string
	}{{EnvOIDCIssuer, &c.Issuer}, {EnvOIDCClientID, &c.ClientID}, {EnvAuthBaseURL, &c.BaseURL}, {EnvOIDCDefaultTeam, &c.DefaultTeam},
		{EnvOIDCAdminGroup, &c.AdminGroup}, {EnvOIDCProviderName, &c.ProviderName}} {
		if v, ok := get(f.env); ok {
			*f.dst = v
		}
	}
	if _, ok := get(EnvOIDCClientID); ok {
		c.google = false
	}
	if v, ok := get(EnvOIDCClientSecret); ok {
		c.ClientSecret = keypool.Secret(v)
	}
	if v, ok := get(EnvOIDCStateSecret); ok {
		c.StateSecret = keypool.Secret(v)
	}
	if v, ok := get(EnvOIDCAllowedDomains); ok {
		c.AllowedDomains = list(v)
	}
	if v, ok := get(EnvOIDCAllowedEmails); ok {
		c.AllowedEmails = list(v)
	}
	if v, ok := get(EnvOIDCAdmins); ok {
		c.Admins = list(v)
	}
	if v, ok := get(EnvOIDCDomainTeams); ok {
		c.DomainTeams = map[string]string{}
		for _, pair := range list(v) {
			d, t, ok := strings.Cut(pair, "=")
			if !ok || strings.TrimSpace(d) == "" || strings.TrimSpace(t) == "" {
				return fmt.Errorf("server: %s: %q is not domain=team", EnvOIDCDomainTeams, pair)
			}
			c.DomainTeams[strings.ToLower(strings.TrimSpace(d))] = strings.TrimSpace(t)
		}
	}
	for _, d := range [...]struct {
		env string
		dst *Duration
	}{{EnvOIDCTokenTTL, &c.TokenTTL}, {EnvOIDCDiscoveryTimeout, &c.Timeout}} {
		if v, ok := get(d.env); ok {
			if err := d.dst.UnmarshalText([]byte(v)); err != nil {
				return fmt.Errorf("server: %s: %w", d.env, err)
			}
		}
	}
	return nil
}

func (c *OIDCConfig) validate() error {
	if !c.Enabled() {
		return nil
	}
	if c.ClientSecret.IsZero() {
		return errors.New("server: OIDC sign-in needs a client secret (GOOGLE_CLIENT_SECRET or KEYPOOL_OIDC_CLIENT_SECRET)")
	}
	u, err := url.Parse(c.BaseURL)
	if c.BaseURL == "" || err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("server: OIDC sign-in needs the public base URL (AUTH_BASE_URL or KEYPOOL_AUTH_BASE_URL, e.g. https://proxy.internal)")
	}
	if s := c.StateSecret.Reveal(); s != "" && len(s) < 32 {
		return errors.New("server: KEYPOOL_OIDC_STATE_SECRET must be at least 32 characters")
	}
	if c.TokenTTL < 0 {
		return errors.New("server: oidc token_ttl must not be negative")
	}
	return nil
}

// splitAllowed moves "user@domain" entries of AllowedDomains to the
// addresses.
func (c *OIDCConfig) splitAllowed() (domains, emails []string) {
	emails = append(emails, c.AllowedEmails...)
	for _, d := range c.AllowedDomains {
		if i := strings.Index(d, "@"); i > 0 {
			emails = append(emails, d)
		} else {
			domains = append(domains, d)
		}
	}
	return domains, emails
}

// setupSSO builds the /auth/ handler when sign-in is configured, and
// tries the provider's discovery in the background (bounded), so that a
// provider that is down does not hold up the start.
func (s *Server) setupSSO(cfg Config) error {
	oc := cfg.OIDC
	if !oc.Enabled() {
		return nil
	}
	if oc.Issuer == "" {
		oc.Issuer = sso.GoogleIssuer
	}
	secret := oc.StateSecret.Reveal()
	if secret == "" {
		var err error
		secret, _, err = readOrCreate(filepath.Join(cfg.DataDir, OIDCStateSecretFile), func() (string, error) {
			b := make([]byte, 32)
			if _, err := rand.Read(b); err != nil {
				return "", err
			}
			return hex.EncodeToString(b), nil
		})
		if err != nil {
			return fmt.Errorf("server: OIDC state secret: %w", err)
		}
	}
	domains, emails := oc.splitAllowed()
	sc := sso.Config{
		Issuer: oc.Issuer, ClientID: oc.ClientID, ClientSecret: oc.ClientSecret.Reveal(), BaseURL: oc.BaseURL,
		StateSecret: []byte(secret), AllowedDomains: domains, AllowedEmails: emails, Admins: oc.Admins,
		AdminGroup: oc.AdminGroup, DomainTeams: oc.DomainTeams, DefaultTeam: oc.DefaultTeam, TokenTTL: time.Duration(oc.TokenTTL), Timeout: time.Duration(oc.Timeout),
		Store: s.st, OnRevoke: s.auth.Invalidate, ClientIP: s.clients.of, Secure: s.cookieSecure,
		Logger: s.log, Now: s.now,
	}
	if s.console != nil {
		sc.Sessions, sc.AdminCookie = s.sess, s.console.SetSessionCookie
	}
	var err error
	if s.sso, err = sso.New(sc); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return nil
}

// discoverSSO tries the provider once at start, bounded; a failure is
// logged and retried by the first /auth/login.
func (s *Server) discoverSSO(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, defaultOIDCStartupTimeout)
	defer cancel()
	if err := s.sso.Discover(ctx); err != nil {
		s.log.Warn("OIDC provider unreachable at start; sign-in retries on the next /auth/login", "issuer", s.cfg.OIDC.Issuer, "err", err)
		return
	}
	s.log.Info("OIDC sign-in ready", "issuer", s.cfg.OIDC.Issuer, "redirect_uri", s.sso.RedirectURL())
}
