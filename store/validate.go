package store

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/textproto"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/meter"
)

// ValidationError is a record that failed validation. Message names the
// field and the rule as the admin API shows them (400 bad_request); it
// wraps [ErrInvalid].
type ValidationError struct {
	Message string
}

// Error returns "store: invalid record: " and the message.
func (e *ValidationError) Error() string { return ErrInvalid.Error() + ": " + e.Message }

// Unwrap returns [ErrInvalid].
func (e *ValidationError) Unwrap() error { return ErrInvalid }

func invalidf(format string, args ...any) error {
	return &ValidationError{Message: fmt.Sprintf(format, args...)}
}

// Bounds of the fields [Validator] checks.
const (
	// MaxServiceTimeout bounds a service's header_timeout, idle_timeout
	// and request_timeout.
	MaxServiceTimeout = 24 * time.Hour
	// MaxDescription bounds a description's length, in bytes.
	MaxDescription = 2000
)

// Validator is the one set of rules for services and keys, whichever way
// they come in: the admin API, the configuration file (server.Config's
// services) and the [Syncer], which resolves the same [Registry]. Its
// methods check a whole record and normalise it in place (spaces
// trimmed, names in their canonical form); the first rule broken is
// returned as a *[ValidationError].
type Validator struct {
	// Registry holds the selector, auth_scheme and classifier names
	// accepted besides the built-in ones. Nil: the built-in ones only.
	Registry *Registry
	// AllowMetadataUpstreams accepts base URLs at link-local and cloud
	// metadata addresses, which are refused by default.
	AllowMetadataUpstreams bool
}

// Service validates and normalises s.
func (v Validator) Service(s *Service) error {
	s.Name = strings.TrimSpace(s.Name)
	switch {
	case s.Name == "":
		return invalidf("name is required")
	case !ValidName(s.Name):
		return invalidf("name %q is invalid: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", s.Name)
	}
	for _, f := range []struct {
		name string
		v    *string
		max  int
	}{{"display_name", &s.DisplayName, 256}, {"description", &s.Description, MaxDescription}, {"external_name", &s.ExternalName, 128}} {
		*f.v = strings.TrimSpace(*f.v)
		if err := CheckText(f.name, *f.v, f.max, false); err != nil {
			return err
		}
	}
	s.Kind = strings.TrimSpace(s.Kind)
	switch {
	case s.Kind != "" && s.Kind != KindRouter:
		return invalidf("kind %q: want \"router\", or leave it out for an upstream service", s.Kind)
	case s.Kind == KindRouter:
		// A router's routes name the services that serve each model;
		// route.Validate checks them against those services.
		if s.BaseURL = strings.TrimSpace(s.BaseURL); s.BaseURL != "" {
			return invalidf("a router has no base_url: its routes name the services that serve each model")
		}
		if err := checkRouterSettings(s.Router); err != nil {
			return err
		}
		if s.Router != nil && *s.Router == (RouterSettings{}) {
			s.Router = nil
		}
	default:
		if len(s.Routes) > 0 {
			return invalidf("routes are for services of kind \"router\"")
		}
		if s.Router != nil {
			return invalidf("router settings are for services of kind \"router\"")
		}
		u, err := checkBaseURL(s.BaseURL, v.AllowMetadataUpstreams)
		if err != nil {
			return err
		}
		s.BaseURL = u
	}
	var err error
	if _, s.AuthScheme, err = v.Registry.AuthScheme(s.AuthScheme); err != nil {
		return invalidf("%s", trimInvalid(err))
	}
	if _, s.Selector, err = v.Registry.Selector(s.Selector); err != nil {
		return invalidf("selector: %s", trimInvalid(err))
	}
	if _, s.Classifier, err = v.Registry.Classifier(s.Classifier); err != nil {
		return invalidf("classifier: %s", trimInvalid(err))
	}
	if s.RateLimitRPM < 0 {
		return invalidf("rate_limit_rpm must not be negative (0 means unlimited)")
	}
	if s.MaxInFlight < 0 {
		return invalidf("max_in_flight must not be negative (0 means unlimited)")
	}
	if s.ProxyHeaders, err = checkProxyHeaders(s.ProxyHeaders); err != nil {
		return err
	}
	if f := strings.TrimSpace(s.LLMFamily); f != "" {
		fam, err := meter.ParseFamily(f)
		if err != nil {
			return invalidf("llm_family %q: want openai, anthropic, gemini, none, or empty to detect it", f)
		}
		s.LLMFamily = fam.String()
	} else {
		s.LLMFamily = ""
	}
	if s.Prices, err = checkPrices(s.Prices); err != nil {
		return err
	}
	if err := s.KeyPolicy.Validate(); err != nil {
		return err
	}
	for _, d := range [...]struct {
		name string
		v    time.Duration
	}{{"header_timeout", s.HeaderTimeout}, {"idle_timeout", s.IdleTimeout}, {"request_timeout", s.RequestTimeout}} {
		switch {
		case d.v < 0:
			return invalidf("%s must not be negative (0 means the server's default)", d.name)
		case d.v > MaxServiceTimeout:
			return invalidf("%s must be at most %s", d.name, MaxServiceTimeout)
		case d.v > 0 && d.v < time.Millisecond:
			return invalidf("%s must be at least 1ms", d.name)
		}
	}
	return s.Limits.Validate()
}

// trimInvalid drops the "keypool: invalid configuration: " prefix of a
// parse error; what is left names the value and the valid options.
func trimInvalid(err error) string {
	return strings.TrimPrefix(err.Error(), keypool.ErrInvalidConfig.Error()+": ")
}

// Validate checks that no limit is negative and normalises ModelsEnabled
// (trimmed, without duplicates; nil when empty).
func (l *Limits) Validate() error {
	if err := nonNegative(named[int]{"rpm_limit", l.RPMLimit}); err != nil {
		return err
	}
	if err := nonNegative(
		named[int64]{"tpm_limit", l.TPMLimit},
		named[int64]{"daily_token_limit", l.DailyTokenLimit},
		named[int64]{"limit_tokens_hour_warn", l.LimitTokensHourWarn},
		named[int64]{"limit_tokens_hour_block", l.LimitTokensHourBlock},
		named[int64]{"limit_tokens_day_warn", l.LimitTokensDayWarn},
		named[int64]{"limit_tokens_day_block", l.LimitTokensDayBlock},
		named[int64]{"limit_tokens_month_warn", l.LimitTokensMonthWarn},
		named[int64]{"limit_tokens_month_block", l.LimitTokensMonthBlock},
		named[int64]{"limit_tokens_total_block", l.LimitTokensTotalBlock},
	); err != nil {
		return err
	}
	if err := nonNegative(
		named[float64]{"limit_cost_hour_warn", l.LimitCostHourWarn},
		named[float64]{"limit_cost_hour_block", l.LimitCostHourBlock},
		named[float64]{"limit_cost_day_warn", l.LimitCostDayWarn},
		named[float64]{"limit_cost_day_block", l.LimitCostDayBlock},
		named[float64]{"limit_cost_month_warn", l.LimitCostMonthWarn},
		named[float64]{"limit_cost_month_block", l.LimitCostMonthBlock},
		named[float64]{"limit_cost_total_block", l.LimitCostTotalBlock},
	); err != nil {
		return err
	}
	ms, err := CleanList("models_enabled", l.ModelsEnabled, 256, 1000)
	if err != nil {
		return err
	}
	l.ModelsEnabled = ms
	return nil
}

// named is a limit's value with its field name.
type named[T int | int64 | float64] struct {
	name string
	v    T
}

// nonNegative reports the first negative limit of fs.
func nonNegative[T int | int64 | float64](fs ...named[T]) error {
	for _, f := range fs {
		if f.v < 0 {
			return invalidf("%s must not be negative (0 means no limit)", f.name)
		}
	}
	return nil
}

// Key validates and normalises k's settings (not its service or status,
// which the caller owns). A stored key (ID set) with a zero Secret keeps
// its stored value, as [Store.UpdateKey] does, and the value is not
// checked. The errors never include the key's value.
func (v Validator) Key(k *Key) error {
	if k.ID == "" || !k.Secret.IsZero() {
		if err := CheckKeyValue(k.Secret); err != nil {
			return err
		}
	}
	if k.BalanceTotal < 0 {
		return invalidf("balance_total must not be negative (0 means unknown or unlimited)")
	}
	if k.BalanceUsed < 0 {
		return invalidf("balance_used must not be negative")
	}
	k.BalanceUnit = strings.ToLower(strings.TrimSpace(k.BalanceUnit))
	k.AccountEmail = strings.TrimSpace(k.AccountEmail)
	k.Tier = strings.TrimSpace(k.Tier)
	for _, f := range []struct {
		name, v string
		max     int
	}{{"balance_unit", k.BalanceUnit, 32}, {"account_email", k.AccountEmail, 320}} {
		if err := CheckText(f.name, f.v, f.max, false); err != nil {
			return err
		}
	}
	switch {
	case k.Weight < 0:
		return invalidf("weight must not be negative (0 means 1)")
	case k.RateLimitRPM < -1:
		return invalidf("rate_limit_rpm must be -1 (unlimited), 0 (the service's) or positive")
	case k.MaxInFlight < 0:
		return invalidf("max_in_flight must not be negative (0 means the service's)")
	}
	if len(k.Labels) > 64 {
		return invalidf("labels has %d entries; at most 64", len(k.Labels))
	}
	for name, val := range k.Labels {
		if err := CheckText("labels key", name, 64, true); err != nil {
			return err
		}
		if err := CheckText(fmt.Sprintf("labels[%q]", name), val, 256, false); err != nil {
			return err
		}
	}
	if len(k.Labels) == 0 {
		k.Labels = nil
	}
	return CheckText("tier", k.Tier, 64, false)
}

// CheckKeyValue validates an upstream key value: present, at most 8192
// bytes, without spaces or control characters. Its errors never include
// the value.
func CheckKeyValue(v keypool.Secret) error {
	s := v.Reveal()
	switch {
	case s == "":
		return invalidf("key_value is required and must not be empty")
	case len(s) > 8192:
		return invalidf("key_value is longer than 8192 bytes")
	case strings.TrimSpace(s) != s:
		return invalidf("key_value must not start or end with white space")
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x21 || c == 0x7f {
			return invalidf("key_value must not contain spaces or control characters")
		}
	}
	return nil
}

// CheckText reports text that is too long, not UTF-8, holds control
// characters or, when required, is empty, naming field.
func CheckText(field, v string, maxLen int, required bool) error {
	switch {
	case required && v == "":
		return invalidf("%s is required and must not be empty", field)
	case len(v) > maxLen:
		return invalidf("%s is longer than %d bytes", field, maxLen)
	case !utf8.ValidString(v):
		return invalidf("%s is not valid UTF-8", field)
	}
	for _, c := range v {
		if c < 0x20 || c == 0x7f {
			return invalidf("%s must not contain control characters", field)
		}
	}
	return nil
}

// CleanList trims a list of names, rejecting empty, overlong (maxLen
// bytes), control characters and more than maxN entries, and dropping
// duplicates. It returns nil for an empty list.
func CleanList(field string, in []string, maxLen, maxN int) ([]string, error) {
	if len(in) > maxN {
		return nil, invalidf("%s has %d entries; at most %d", field, len(in), maxN)
	}
	var out []string
	seen := map[string]bool{}
	for i, v := range in {
		v = strings.TrimSpace(v)
		if err := CheckText(fmt.Sprintf("%s[%d]", field, i), v, maxLen, true); err != nil {
			return nil, err
		}
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out, nil
}

// ValidName reports whether v matches [a-z0-9][a-z0-9._-]{0,63}: the form
// of service and tier names, which appear in URLs.
func ValidName(v string) bool {
	if v == "" || len(v) > 64 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// checkPrices validates a price table and returns it as compact JSON; ""
// and "null" mean none.
func checkPrices(raw string) (string, error) {
	b := bytes.TrimSpace([]byte(raw))
	if len(b) == 0 || string(b) == "null" {
		return "", nil
	}
	if b[0] != '{' {
		return "", invalidf("prices must be a JSON object of model name to price")
	}
	if _, err := meter.ParsePrices(b); err != nil {
		return "", invalidf("prices: %s", strings.TrimPrefix(err.Error(), "meter: prices: "))
	}
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return "", invalidf("prices: malformed JSON")
	}
	return out.String(), nil
}

// hopByHop are headers that proxy_headers may not set: connection-level
// headers, and headers the proxy computes itself.
var hopByHop = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true, "Proxy-Authorization": true,
	"Proxy-Connection": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Host": true, "Content-Length": true,
}

// checkProxyHeaders validates proxy_headers and canonicalises their names.
func checkProxyHeaders(h map[string]string) (map[string]string, error) {
	if len(h) > 64 {
		return nil, invalidf("proxy_headers has %d entries; at most 64", len(h))
	}
	if len(h) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(h))
	for name, v := range h {
		if !keypool.ValidHeaderName(name) {
			return nil, invalidf("proxy_headers: %q is not a valid header name", name)
		}
		c := textproto.CanonicalMIMEHeaderKey(name)
		if hopByHop[c] {
			return nil, invalidf("proxy_headers: %s is a hop-by-hop or computed header and cannot be set", c)
		}
		if _, dup := out[c]; dup {
			return nil, invalidf("proxy_headers: %s is given twice", c)
		}
		if len(v) > 4096 || strings.ContainsAny(v, "\r\n\x00") {
			return nil, invalidf("proxy_headers: the value of %s is not a valid header value", c)
		}
		out[c] = strings.TrimSpace(v)
	}
	return out, nil
}

// checkRouterSettings checks a router's settings (nil is the defaults).
func checkRouterSettings(rs *RouterSettings) error {
	if rs == nil {
		return nil
	}
	for _, f := range [...]struct {
		name     string
		v, limit int
	}{
		{"max_attempts", rs.MaxAttempts, 16},
		{"breaker_failures", rs.BreakerFailures, 1000},
		{"breaker_open_seconds", rs.BreakerOpenSeconds, 86400},
		{"breaker_max_open_seconds", rs.BreakerMaxOpenSeconds, 86400},
	} {
		if f.v < 0 || f.v > f.limit {
			return invalidf("router.%s must be between 1 and %d (0 or absent for the default), not %d", f.name, f.limit, f.v)
		}
	}
	if rs.BreakerMaxOpenSeconds > 0 && rs.BreakerMaxOpenSeconds < rs.BreakerOpenSeconds {
		return invalidf("router.breaker_max_open_seconds (%d) must not be less than router.breaker_open_seconds (%d)",
			rs.BreakerMaxOpenSeconds, rs.BreakerOpenSeconds)
	}
	return nil
}
